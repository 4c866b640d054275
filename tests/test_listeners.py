"""What a run listens on, seen with `ss` while it runs (issue 17): no listener answers without the run's
credentials beyond Ray's own gRPC servers, which need the run's token; Ray's metrics exporters (plain
HTTP, no credential: actor, node and session names, addresses, PIDs) are off. A local run keeps every
socket on loopback; on Slurm, what can bind the node's address does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import deadline, listening, session_pids
from test_slurm import slurm_conf, slurm_run  # noqa: F401 - fixtures

from matrix_hpc import fate
from matrix_hpc.runtime.security import RAY_METRICS_OFF, RUN_TMP_VAR

CLI = [sys.executable, "-m", "matrix_hpc.cli"]
LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]"}
WILDCARD = {"*", "0.0.0.0", "[::]"}
# Process names as `ss` shows them (the kernel's 15 characters).
RAY_PARTS = {"gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv"}
# A call each of Ray's gRPC servers knows (GCS, raylet, its object manager, workers, the agent): Ray
# checks the token only once it has found the method. Empty requests: nothing to do with the token.
RAY_CALLS = ("/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.NodeManagerService/GetSystemConfig",
             "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/NumPendingTasks",
             "/ray.rpc.LogService/ListLogs")

AGENTS = '''
import asyncio
from pathlib import Path

from matrix_hpc import Agent

HERE = Path(__file__).parent


class Hold(Agent):
    async def step(self, item, ctx):
        (HERE / "waiting").touch()
        while not (HERE / "go").exists():  # the test looks at the run's sockets meanwhile
            await asyncio.sleep(0.05)
        item.answer = (await ctx.llm("echo").chat(item.text)).text
        item.ran = (await ctx.sandbox("box").run(["true"])).exit_code == 0
        return "done"
'''


def _write_job(d: Path) -> Path:
    d.mkdir()
    (d / "item.proto").write_text('syntax = "proto3";\npackage lis;\n'
                                  "message Item { string text = 1; string answer = 2; bool ran = 3; }\n")
    (d / "agents.py").write_text(AGENTS)
    (d / "data.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i}"}) + "\n" for i in range(2)))
    (d / "job.yaml").write_text(yaml.safe_dump({
        "name": "lis", "dataset": {"path": "data.jsonl", "id_field": "id"},
        "payload": {"proto": "item.proto", "type": "lis.Item"},
        "roles": {"hold": {"agent": "agents:Hold", "concurrency": 2}}, "first_role": "hold",
        "services": {"llm": {"echo": {"backend": "scripted"}}, "sandbox": {"box": {"image": "python"}}},
        "run": {"output_dir": "out", "commit_interval_s": 0.2},
    }))
    return d / "job.yaml"


def listeners_once_up(pids, timeout_s: float = 60) -> list[tuple[str, int, str]]:
    """``listening(pids())`` once every part of Ray listens (its agents start their servers last)."""
    end = time.monotonic() + timeout_s
    while True:
        sockets = listening(pids())
        if RAY_PARTS <= {n for _, _, n in sockets} or time.monotonic() > end:
            return sockets
        time.sleep(0.2)


def http_answer(host: str, port: int) -> int | str:
    """The status of GET /metrics without any credential (or why there was none)."""
    try:
        return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:  # noqa: BLE001 - a gRPC port answers HTTP/1 with garbage, some not at all
        return type(e).__name__


def grpc_answer(target: str, token: str = "") -> str:
    """OK if one of Ray's calls goes through, else UNAUTHENTICATED if one was refused for want of
    the token, else what the calls got."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    got = set()
    with grpc.insecure_channel(target) as ch:
        for method in RAY_CALLS:
            try:
                ch.unary_unary(method)(b"", timeout=10, metadata=metadata)
                return "OK"
            except grpc.RpcError as e:
                got.add(e.code().name)
    return "UNAUTHENTICATED" if "UNAUTHENTICATED" in got else "/".join(sorted(got))


def test_a_local_run_has_no_metrics_exporter_and_only_loopback_listeners(tmp_path):
    job = _write_job(tmp_path / "job")
    proc = subprocess.Popen([*CLI, "run", str(job), "--no-progress", "--json"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with deadline(240):
            while not (job.parent / "waiting").exists():
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            sockets = listeners_once_up(lambda: session_pids(proc.pid))
            names = {n for _, _, n in sockets}
            assert RAY_PARTS <= names, sockets
            assert {a for a, _, _ in sockets} <= LOOPBACK, sockets
            answers = {(p, n): http_answer("127.0.0.1", p) for _, p, n in sockets}
            assert [k for k, v in answers.items() if v == 200] == [], answers
            (job.parent / "go").touch()
            out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, out + err
    assert json.loads(out.strip().splitlines()[-1])["done"] == 2


@pytest.mark.slow
def test_rays_own_exporters_would_answer_anyone(tmp_path):
    """Control for the probe above: a Ray started without ``RAY_METRICS_OFF`` serves its metrics to
    anyone who asks (here on loopback, the local-only mode)."""
    # Not this session's run environment: the suite's shared Ray (a LocalRay) set the metrics-off and
    # run-mark variables in this process for as long as it lives.
    ours = {*RAY_METRICS_OFF, fate.OWNER_VAR, RUN_TMP_VAR}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k not in ours},
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="mhpc-ray-"))
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port=0", "--block",
                             "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={ray_tmp}/r",
                             "--dashboard-agent-listen-port=0", f"--ray-client-server-port={_free_port()}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with deadline(120):
            answered: list = []
            while not answered:
                assert head.poll() is None
                answered = [(p, n) for _, p, n in listening(session_pids(head.pid))
                            if http_answer("127.0.0.1", p) == 200]
                time.sleep(1)
    finally:
        for pid in session_pids(head.pid):  # never `ray stop`: it stops every Ray of the machine
            os.kill(pid, 9)
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert answered


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""  # exited meanwhile


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_pids(uid: int, job_id: str) -> set[int]:
    """Processes of ``uid`` started for Slurm job ``job_id`` (that inherit SLURM_JOB_ID), and all
    their descendants."""
    parents, roots = {}, set()
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or d.stat().st_uid != uid:
                continue
            stat = (d / "stat").read_text()
            parents[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            if f"\0SLURM_JOB_ID={job_id}\0".encode() in b"\0" + (d / "environ").read_bytes():
                roots.add(int(d.name))
        except (OSError, ValueError):
            pass
    found = set(roots)
    grew = True
    while grew:
        more = {p for p, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


@pytest.mark.slow
def test_a_slurm_run_binds_the_node_address_and_ray_needs_its_token(slurm_run):  # noqa: F811
    r = slurm_run(rows=4, step_s=4.0)
    job_id = r.submit()
    r.wait(lambda: (r.dir / "calls.log").exists(), 180, "the first step", job_id)
    sockets = listeners_once_up(lambda: _job_pids(r.user.uid, job_id))
    pids = _job_pids(r.user.uid, job_id)
    node = (r.run_dir / "slurm" / "ray").glob("*/head").__next__().read_text().rsplit(":", 1)[0]
    token = (r.run_dir / "credentials" / "ray.token").read_text().strip()
    names = {n for _, _, n in sockets}
    assert RAY_PARTS <= names, sockets

    # Nothing answers HTTP without credentials (Ray's exporters are off; its agents want the token).
    answers = {(a, p, n): http_answer(node, p) for a, p, n in sockets}
    assert [k for k, v in answers.items() if v == 200] == [], answers
    # What binds every interface is one of Ray's gRPC servers (GCS, raylet, agent, workers: Ray
    # offers loopback or every interface), and it refuses a call without the run's token; the token
    # opens the GCS (the refusal is real).
    wild = [(p, n) for a, p, n in sockets if a in WILDCARD and n != "srun"]  # srun: Slurm's step I/O
    assert {"gcs_server", "raylet"} <= {n for _, n in wild}, wild
    refused = {(p, n): grpc_answer(f"{node}:{p}") for p, n in wild}
    assert refused == dict.fromkeys(refused, "UNAUTHENTICATED"), refused
    gcs = next(p for p, n in wild if n == "gcs_server")
    assert grpc_answer(f"{node}:{gcs}", token) == "OK"
    # Everything else is on the node's address (or loopback: Ray's client server adds it).
    assert {a for a, _, _ in sockets if a not in WILDCARD} <= {node, f"[::ffff:{node}]"} | LOOPBACK, sockets
    # Ray's folders on the node are in a fresh folder of the user's, closed to others.
    ray_temp = {Path(m).parent for p in pids for m in re.findall(r"--temp-dir=(\S+)", _cmdline(p))}
    assert ray_temp and all(d.stat().st_mode & 0o777 == 0o700 and d.stat().st_uid == r.user.uid
                            for d in ray_temp), ray_temp
    r.wait_ended(job_id, 240)
    r.check_complete()
