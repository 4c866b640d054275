"""No one else gets in: a real `matrix-hpc run` (local Ray, scripted LLM, bubblewrap sandbox) looked at
from outside while it runs, with a second, unprivileged user trying to get in; the run directory
checks; inputs that try to be code."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import deadline, listening, session_pids

from matrix_hpc.job.load import materialize_generated
from matrix_hpc.services.auth import CredentialError

CLI = [sys.executable, "-m", "matrix_hpc.cli"]
LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}
# A text pickle that would run `touch MARKER` if anything unpickled it.
PICKLE_ROW = "cposix\nsystem\n(S'touch {marker}'\ntR."

AGENTS = '''
import asyncio
import os
import sys
from pathlib import Path

from matrix_hpc import Agent

HERE = Path(__file__).parent


class Ask(Agent):
    async def step(self, item, ctx):
        (HERE / "waiting").touch()
        while not (HERE / "go").exists():  # the test holds the run here while it looks around
            await asyncio.sleep(0.05)
        item.answer = (await ctx.llm("echo").chat(item.text[:40])).text
        item.ran = (await ctx.sandbox("box").run(["python3", "-c", "print(6 * 7)"])).stdout.strip()
        item.module_file = sys.modules[type(item).__module__].__file__
        return "done"
'''

# Harmless calls that GCS, raylet and every Ray worker answer (an empty request is a valid one).
RAY_METHODS = {"gcs": "/ray.rpc.NodeInfoGcsService/GetClusterId", "raylet": "/ray.rpc.NodeManagerService/GetSystemConfig",
               "worker": "/ray.rpc.CoreWorkerService/NumPendingTasks"}
PROBE = '''
import json, sys, urllib.request
import grpc
ports, methods, token, llm, sandbox, paths = json.loads(sys.argv[1])
metadata = [("authorization", f"Bearer {token}")] if token else None
out = {}
for port in ports:  # every port of the run: Ray's gRPC servers and HTTP agents
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    for kind, method in methods.items():
        try:
            ch.unary_unary(method)(b"", timeout=5, metadata=metadata)
            out[f"{kind}:{port}"] = "OK"
        except grpc.RpcError as e:
            out[f"{kind}:{port}"] = e.code().name
    if token:
        continue
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/job_agent/jobs/", method="POST",
                                 data=json.dumps({"entrypoint": "id"}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        out[f"job:{port}"] = urllib.request.urlopen(req, timeout=5).status
    except urllib.error.HTTPError as e:
        out[f"job:{port}"] = e.code
    except Exception as e:
        out[f"job:{port}"] = type(e).__name__
for name, addr, method in [("llm", llm, "/matrix_hpc.llm.v1.LLM/ModelInfo"),
                           ("sandbox", sandbox, "/matrix_hpc.sandbox.v1.Sandbox/ReleaseOwners")]:
    try:
        grpc.insecure_channel(addr).unary_unary(method)(b"", timeout=5)
        out[name] = "OK"
    except grpc.RpcError as e:
        out[name] = e.code().name
for p in paths:
    try:
        open(p, "rb").read() if not p.endswith("/") else __import__("os").listdir(p)
        out[p] = "read"
    except OSError as e:
        out[p] = type(e).__name__
print(json.dumps(out))
'''


def _write_job(d: Path, marker: Path) -> Path:
    d.mkdir()
    (d / "item.proto").write_text(textwrap.dedent("""
        syntax = "proto3";
        package sec;
        message Item { string text = 1; string answer = 2; string ran = 3; string module_file = 4; }
    """))
    (d / "agents.py").write_text(AGENTS)
    rows = [{"id": "r0", "text": PICKLE_ROW.format(marker=marker)}, *({"id": f"r{i}", "text": f"row {i}"}
                                                                      for i in range(1, 4))]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "job.yaml").write_text(yaml.safe_dump({
        "name": "sec", "dataset": {"path": "data.jsonl", "id_field": "id"},
        "payload": {"proto": "item.proto", "type": "sec.Item"},
        "roles": {"ask": {"agent": "agents:Ask", "concurrency": 4}}, "first_role": "ask",
        "services": {"llm": {"echo": {"backend": "scripted"}}, "sandbox": {"box": {"image": "python"}}},
        "run": {"output_dir": "out", "commit_interval_s": 0.2},
    }))
    return d / "job.yaml"


def _cmdlines(pids: set[int]) -> dict[int, str]:
    lines = {}
    for p in pids:
        try:
            lines[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return lines


def _contains_any(root: Path, needles: list[bytes], skip: Path | None = None) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and (skip is None or not p.is_relative_to(skip)):
            data = p.read_bytes()
            hits += [f"{p}" for n in needles if n in data]
    return hits


@pytest.mark.slow
def test_a_local_run_lets_no_one_else_in(tmp_path, unprivileged_user):
    marker = tmp_path / "unpickled"
    job = _write_job(tmp_path / "job", marker)
    run_dir = tmp_path / "job" / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # what a user may have set: the local run ignores it
    proc = subprocess.Popen([*CLI, "run", str(job), "--no-progress", "--json"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with deadline(240):
            while not (job.parent / "waiting").exists():
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            pids = session_pids(proc.pid)
            sockets = listening(pids, udp=True)
            cmdlines = _cmdlines(pids)
            temp_dirs = {m for c in cmdlines.values() for m in re.findall(r"(/\S*/mhpc-ray-[^/\s]+)/", c)}
            secret = (run_dir / "credentials/service.secret").read_text().strip()
            token = (run_dir / "credentials/ray.token").read_text().strip()
            needles = [secret.encode(), token.encode()]

            # Every socket of the run is on loopback, and the run has all the parts we expect; its
            # services listen on no port at all, only on Unix sockets in the owner-only run directory.
            assert {a for a, _, _ in sockets} <= LOOPBACK, sockets
            names = {n for _, _, n in sockets}
            assert {"gcs_server", "raylet", "ray::LLMReplica", "ray::SandboxRep"} <= names, names  # Ray's ports
            assert _health_answers(sockets, ["matrix_hpc.llm.v1.LLM", "matrix_hpc.sandbox.v1.Sandbox"]) == []
            service_sockets = _unix_listening(pids)
            gcs_port = next(p for _, p, n in sockets if n == "gcs_server")
            ports = sorted({p for _, p, _ in sockets})

            # No secret on any command line or in any environment, Ray's session files hold none.
            assert len(temp_dirs) == 1, temp_dirs
            (ray_temp,) = temp_dirs
            assert stat.S_IMODE(os.stat(ray_temp).st_mode) == 0o700
            assert not [c for c in cmdlines.values() if secret in c or token in c]
            environs = [Path(f"/proc/{p}/environ").read_bytes() for p in pids if Path(f"/proc/{p}").exists()]
            assert not [e for e in environs if any(n in e for n in needles)]
            assert _contains_any(Path(ray_temp), needles) == []

            # The other user tries: Ray without the token, the job API, both services, our files.
            llm_sock, sandbox_sock = service_sockets["ray::LLMReplica"], service_sockets["ray::SandboxRep"]
            assert {llm_sock.parent, sandbox_sock.parent} == {run_dir / "sockets"}
            llm_addr, sandbox_addr = f"unix:{llm_sock}", f"unix:{sandbox_sock}"
            targets = [f"{run_dir}/", f"{run_dir}/credentials/service.secret", f"{ray_temp}/",
                       f"/proc/{proc.pid}/environ", str(llm_sock)]
            probe = unprivileged_user.run([sys.executable, "-c", PROBE, json.dumps(
                [ports, RAY_METHODS, "", llm_addr, sandbox_addr, targets])], timeout=120)
            assert probe.returncode == 0, probe.stderr
            seen = json.loads(probe.stdout)
            # The same calls with the run's token, from us: the ones that go through are the real
            # targets, and the other user got UNAUTHENTICATED from every one of them.
            control = subprocess.run([sys.executable, "-c", PROBE, json.dumps(
                [ports, RAY_METHODS, token, llm_addr, sandbox_addr, []])], capture_output=True, text=True,
                timeout=120)
            assert control.returncode == 0, control.stderr
            answered = {k for k, v in json.loads(control.stdout).items() if v == "OK"}
            assert {k.split(":")[0] for k in answered} == {"gcs", "raylet", "worker"}, answered
            assert f"gcs:{gcs_port}" in answered
            assert {seen[k] for k in answered} == {"UNAUTHENTICATED"}
            assert [k for k, v in seen.items() if v == "OK"] == []
            assert [k for k, v in seen.items() if k.startswith("job:") and v == 200] == []
            assert (seen["llm"], seen["sandbox"]) == ("UNAVAILABLE", "UNAVAILABLE")  # cannot even connect
            assert [seen[t] for t in targets] == ["PermissionError"] * len(targets)

            (job.parent / "go").touch()
            out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, out + err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["done"], summary["failed"]) == (4, 0)
    assert not Path(ray_temp).exists()
    assert secret not in out + err and token not in out + err

    exported = tmp_path / "export.jsonl"
    done = subprocess.run([*CLI, "export", str(run_dir), "--format", "jsonl", "-o", str(exported)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {r["row_id"]: r for r in map(json.loads, exported.read_text().splitlines())}
    assert len(rows) == 4
    assert rows["r0"]["text"] == PICKLE_ROW.format(marker=marker)  # a pickle in a row is just text
    assert not marker.exists()
    for r in rows.values():
        assert (r["ran"], r["answer"]) == ("42", r["text"][:40])
        # The payload module came from the run's own generated folder, not a shared one in /tmp.
        assert Path(r["module_file"]).parent.parent == run_dir / "generated"
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert _contains_any(tmp_path, needles, skip=run_dir / "credentials") == []
    loose = [str(p) for p in [run_dir, *run_dir.rglob("*")]
             if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077]
    assert loose == []


def _health_answers(sockets, services: list[str]) -> list[int]:
    """The ports (of the run's processes) whose open health service knows one of ``services``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    found = []
    for _, port, _ in sockets:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            for service in services:
                try:
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
                    found.append(port)
                except grpc.RpcError:
                    continue
    return found


def _unix_listening(pids: set[int]) -> dict[str, Path]:
    """Process name -> the Unix socket (``*.sock``) that process of the run listens on."""
    out = subprocess.run(["ss", "-lxpH"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        owners = {int(p): n for n, p in re.findall(r'\("([^"]+)",pid=(\d+)', line)}
        path = next((f for f in line.split() if f.startswith("/") and f.endswith(".sock")), None)
        mine = [n for p, n in owners.items() if p in pids]
        if path and mine:
            found[mine[0]] = Path(path)
    return found


# ------------------------------------------------------------------------------- run directory


def _run_into(job: Path, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", str(job), "-o", str(run_dir), "--no-progress"], capture_output=True,
                          text=True, timeout=120)


def test_a_run_directory_others_can_write_to_is_refused(tmp_path, user_dir, unprivileged_user):
    job = _write_job(tmp_path / "job", tmp_path / "unused")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    done = _run_into(job, shared)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{shared}: other users can write to the run directory (mode 0777)" in done.stderr
    done = _run_into(job, shared / "inside")
    assert done.returncode == 2
    assert f"refusing a run directory inside {shared}, which every user can write to" in done.stderr
    assert not (shared / "inside").exists()
    if os.geteuid() == 0:  # a folder that belongs to someone else
        done = _run_into(job, user_dir)
        assert done.returncode == 2
        assert f"the run directory belongs to uid {unprivileged_user.uid}" in done.stderr
    # Nothing of a run went there (load_job caches its dataset digest in an existing run directory).
    assert {p.name for p in shared.iterdir()} <= {"dataset_digest.json"}


def test_generated_code_goes_only_to_a_private_folder(tmp_path, user_dir, unprivileged_user):
    generated = {"x_pb2.py": "VALUE = 1\n"}
    folder = materialize_generated(generated, tmp_path / "gen")
    assert (folder / "x_pb2.py").read_text() == "VALUE = 1\n"
    assert stat.S_IMODE((tmp_path / "gen").stat().st_mode) == 0o700
    open_gen = tmp_path / "open"
    open_gen.mkdir(mode=0o777)
    open_gen.chmod(0o777)
    with pytest.raises(CredentialError, match="accessible to other users"):
        materialize_generated(generated, open_gen)
    if os.geteuid() == 0:
        # The other user prepares a folder with a doctored module: it is refused, not imported.
        planted = user_dir / "gen"
        unprivileged_user.run(["mkdir", "-m", "700", str(planted)], check=True)
        with pytest.raises(CredentialError, match=f"belongs to uid {unprivileged_user.uid}"):
            materialize_generated(generated, planted)


# ------------------------------------------------------------------------------------ inputs


def test_a_yaml_tag_is_rejected_and_runs_nothing(tmp_path):
    from matrix_hpc.job.load import JobFileError, load_job

    marker = tmp_path / "tagged"
    job = _write_job(tmp_path / "job", tmp_path / "unused")
    text = job.read_text().replace("name: sec", f"name: !!python/object/apply:os.system ['touch {marker}']")
    job.write_text(text)
    with pytest.raises(JobFileError, match="python/object/apply"):
        load_job(job)
    assert not marker.exists()


def test_pickled_bytes_in_a_parquet_row_stay_bytes(tmp_path):
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from matrix_hpc.job.dataset import iter_rows

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'unpickled'}",))

    blob = pickle.dumps(Boom())
    pq.write_table(pa.table({"id": ["a"], "blob": [blob]}), tmp_path / "rows.parquet")
    rows = [(index, row) for index, row, _ in iter_rows(tmp_path / "rows.parquet")]
    assert rows == [(0, {"id": "a", "blob": blob})]
    assert not (tmp_path / "unpickled").exists()


# ------------------------------------------------------------------------------ cluster Ray


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_cluster_run_authenticates_with_the_run_token(tmp_path, unprivileged_user):
    """As the Slurm bootstrap does: `ray start` with ``ray_token_env(run_dir)``; the driver, given only
    RAY_ADDRESS, finds the token in the run directory; the other user is refused by the GCS."""
    from matrix_hpc.runtime.security import prepare_run_dir, ray_token, ray_token_env

    job = _write_job(tmp_path / "job", tmp_path / "unused")
    (job.parent / "go").touch()  # nothing to hold here
    run_dir = prepare_run_dir(tmp_path / "job" / "out")
    # A one-node "cluster" kept on loopback (tests bind nothing else): Ray's local-only flag for every
    # process, since Ray would swap 127.0.0.1 for the machine's address otherwise.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port = _free_port()
    gcs = f"127.0.0.1:{port}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="mhpc-ray-"))
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                             f"--node-ip-address={gcs.rsplit(':', 1)[0]}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={ray_tmp}/r"],
                            env={**env, **ray_token_env(run_dir)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with deadline(240):
            out, _ = head.communicate(timeout=180)  # `ray start` returns once the head node is up
            assert head.returncode == 0, out
            done = subprocess.run([*CLI, "run", str(job), "--no-progress", "--json"], capture_output=True, text=True,
                                  env={**env, "RAY_ADDRESS": gcs}, timeout=200)
            assert done.returncode == 0, done.stdout + done.stderr
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            assert (summary["done"], summary["failed"]) == (4, 0)
            # On a cluster the services spoke TLS with the run's own certificate.
            assert {p.name for p in (run_dir / "credentials").iterdir()} == {
                "ray.token", "service.secret", "tls.crt", "tls.key"}
            probe = unprivileged_user.run([sys.executable, "-c", textwrap.dedent(f"""
                import grpc
                try:
                    grpc.insecure_channel("{gcs}").unary_unary("{RAY_METHODS['gcs']}")(b"", timeout=10)
                    print("OK")
                except grpc.RpcError as e:
                    print(e.code().name)
            """)], timeout=60)
            assert probe.stdout.strip() == "UNAUTHENTICATED", probe.stdout + probe.stderr
            with grpc.insecure_channel(gcs) as ch:  # the run's token opens it: the refusal above is real
                ch.unary_unary(RAY_METHODS["gcs"])(b"", timeout=10,
                                                   metadata=[("authorization", f"Bearer {ray_token(run_dir)}")])
    finally:
        if head.poll() is None:
            head.kill()
        for pid in session_pids(head.pid):  # the head's processes (never `ray stop`: it stops every Ray)
            os.kill(pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
