"""One writer per run directory, end to end, as the ordinary test user: while a run is alive, a
second `run` or `resume` of its run directory is refused at once, naming it (pid and host); once it
is killed (kill -9 of every process of the run), `resume` takes the run directory over and finishes
it with every row committed once. (The Slurm side is in tests/test_slurm.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import PROTO
from test_resume import kill_session

from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.rundir import RunDir
from matrix_hpc.store import RunStore

AGENTS = """
import asyncio, os
from matrix_hpc import DONE

async def ping(item, ctx):
    await asyncio.sleep(float(os.environ["STEP_S"]))
    return "pong"

async def pong(item, ctx):
    await asyncio.sleep(float(os.environ["STEP_S"]))
    return DONE if ctx.step >= 3 else "ping"
"""


def write_job(folder: Path, rows: int, user) -> Path:
    d = folder / "job"
    d.mkdir()
    (d / "item.proto").write_text(PROTO.format(pkg="onewriter"))
    (d / "agents.py").write_text(AGENTS)
    (d / "data.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": "x", "n": i}) + "\n"
                                          for i in range(rows)))
    spec = {"name": "onewriter", "dataset": {"path": "data.jsonl", "id_field": "id"},
            "payload": {"proto": "item.proto", "type": "tests.onewriter.Item"},
            "roles": {"ping": {"agent": "agents:ping"}, "pong": {"agent": "agents:pong"}}, "first_role": "ping",
            "run": {"output_dir": "out", "commit_interval_s": 0.2, "checkpoint_interval_s": 1, "max_in_flight": 4}}
    (d / "job.yaml").write_text(json.dumps(spec))
    for p in [d, *d.iterdir()]:
        os.chown(p, user.uid, user.gid)
    return d / "job.yaml"


def matrix_hpc(user, *args: str, step_s: float) -> subprocess.Popen:
    argv = user.command([sys.executable, "-m", "matrix_hpc.cli", *args], env={"STEP_S": str(step_s),
                                                                             "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def committed(run_dir: Path) -> dict:
    try:
        return RunStore.open(run_dir).committed()
    except Exception:  # noqa: BLE001 - no store yet
        return {}


def test_a_second_run_is_refused_while_the_first_lives_and_takes_over_once_it_died(unprivileged_user, user_dir):
    rows = 60
    job = write_job(user_dir, rows, unprivileged_user)
    run_dir = job.parent / "out"
    # 60 rows, 4 in flight, 4 steps of 1 s: about a minute of work, far longer than the checks below.
    first = matrix_hpc(unprivileged_user, "run", str(job), "--no-progress", step_s=1)
    end = time.monotonic() + 240
    while not committed(run_dir):  # the first run is up and writing
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < end, "no commit within 240 s"
        time.sleep(0.2)
    holder = RunDir(run_dir).holder()
    assert holder.command == "run" and holder.host == socket.gethostname()
    started = time.monotonic()
    for argv in (["run", str(job)], ["resume", str(run_dir)]):
        second = matrix_hpc(unprivileged_user, *argv, "--no-progress", step_s=0.01)
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 2, out
        assert f"{run_dir} is in use by matrix-hpc run (pid {holder.pid} on {socket.gethostname()}, since" in out, out
        assert "Ray" not in out  # refused before anything started
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    print(f"two refusals in {time.monotonic() - started:.1f}s")

    kill_session(first.pid)  # the driver, Ray and its workers: no release, holder.json stays
    first.wait(60)
    assert RunDir(run_dir).holder() == holder
    kept = len(committed(run_dir))
    assert 0 < kept < rows
    resumed = matrix_hpc(unprivileged_user, "resume", str(run_dir), "--no-progress", "--json", step_s=0.01)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert f"taking over from matrix-hpc run (pid {holder.pid} on {socket.gethostname()}" in out, out
    assert json.loads(out.strip().splitlines()[-1])["done_total"] == rows
    got = Counter(task_pb2.Task.FromString(d).task_id for d in RunStore.open(run_dir).iter_results())
    assert got == Counter({f"r{i}#0": 1 for i in range(rows)})
    assert RunDir(run_dir).holder() is None  # released at the end
