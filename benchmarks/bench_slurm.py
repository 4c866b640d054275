"""Slurm figures on the local Slurm of slurm/ (start it first, or run through slurm/with-local-slurm.sh):

- submit -> first committed row (2 nodes: Slurm scheduling, Ray head + worker, actors, first row);
- preemption signal -> the requeued job's first new commit (checkpoint, requeue, bootstrap, resume);
- rows lost and rows repeated across N preemptions in a row of one run (must be 0 and 0), and
  steps run twice (0: every task continued from its saved step).

Usage: .venv/bin/python benchmarks/bench_slurm.py [--preemptions 10]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matrix_hpc._gen.v1 import task_pb2  # noqa: E402
from matrix_hpc.rundir import RunDir  # noqa: E402
from matrix_hpc.store import RunStore  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001 - figures appear as they come
STEPS = 6
PROTO = 'syntax = "proto3";\npackage bench.slurm;\nmessage Item { string text = 1; repeated string path = 2; }\n'
AGENTS = f"""
import asyncio, os
from matrix_hpc import DONE

def _count(ctx):
    fd = os.open(os.path.join(os.path.dirname(__file__), "calls.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{{ctx.task_id}} {{ctx.step}}\\n".encode())
    os.close(fd)

async def step(item, ctx):
    await asyncio.sleep(0.3)
    _count(ctx)
    item.path.append(str(ctx.step))
    return DONE if ctx.step + 1 >= {STEPS} else ("b" if ctx.step % 2 == 0 else "a")
"""


def make_job(root: Path, rows: int) -> Path:
    d = root / "job"
    d.mkdir()
    (d / "item.proto").write_text(PROTO)
    (d / "agents.py").write_text(AGENTS)
    (d / "data.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i}"}) + "\n" for i in range(rows)))
    spec = {"name": "bench_slurm", "dataset": {"path": "data.jsonl", "id_field": "id"},
            "payload": {"proto": "item.proto", "type": "bench.slurm.Item"},
            "roles": {"a": {"agent": "agents:step", "replicas": 2}, "b": {"agent": "agents:step", "replicas": 2}},
            "first_role": "a",
            "run": {"output_dir": "out", "commit_interval_s": 0.2, "checkpoint_interval_s": 2, "max_in_flight": 10},
            "slurm": {"nodes": 2, "time_min": 30, "signal_delay_s": 10, "max_requeues": 100}}
    (d / "job.yaml").write_text(json.dumps(spec, indent=1))
    return d / "job.yaml"


def committed(run_dir: Path) -> int:
    try:
        return len(RunStore.open(run_dir).committed())
    except Exception:  # noqa: BLE001 - no store yet
        return 0


def wait_until(condition, timeout: float, what: str, job_id: str | None = None) -> float:
    end = time.monotonic() + timeout
    polls = 0
    while not condition():
        polls += 1
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        if job_id and polls % 20 == 0 and squeue_state(job_id) == "" and not condition():
            raise SystemExit(f"job {job_id} ended before {what}")
        time.sleep(0.05)
    return time.monotonic()


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def preempt() -> float:
    t = time.monotonic()
    subprocess.run(["sbatch", "-p", "high", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1"],
                   check=True, capture_output=True)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preemptions", type=int, default=10)
    args = p.parse_args()
    env = {**os.environ, "MATRIX_HPC_NODE_LOCAL_PATHS": ""}  # every local "node" is this machine
    rows = 60 * (args.preemptions + 2)
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        job = make_job(Path(tmp), rows)
        run_dir = job.parent / "out"
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "matrix_hpc.cli", "submit", str(job)], env=env,
                             capture_output=True, text=True, check=True).stdout
        job_id = re.search(r"submitted Slurm job (\d+)", out).group(1)
        try:
            first = wait_until(lambda: committed(run_dir) >= 1, 600, "the first commit", job_id)
            print(f"submit -> first committed row (2 nodes): {first - t0:.1f} s")
            resumes = []
            for i in range(args.preemptions):
                before = committed(run_dir)
                if before >= rows:
                    print(f"the run finished after {i} preemption(s)")
                    break
                signal_at = preempt()
                wait_until(lambda n=i + 1: RunDir(run_dir).ray_attempt(job_id, n).exists(), 600, "the requeue",
                           job_id)
                # Counted once the stopped job is gone: it commits the rows that finish while it stops.
                before = committed(run_dir)
                new = wait_until(lambda b=before: committed(run_dir) > b, 600, "a new commit after the requeue", job_id)
                resumes.append(new - signal_at)
                print(f"preemption {i + 1}: signal -> requeued job's first new commit {resumes[-1]:.1f} s")
            wait_until(lambda: squeue_state(job_id) == "", 1200, "the run to finish")
        finally:
            subprocess.run(["scancel", job_id], capture_output=True)
        results = [task_pb2.Task.FromString(d) for d in RunStore.open(run_dir).iter_results()]
        ids = Counter(t.task_id for t in results)
        expected = {f"r{i}#0" for i in range(rows)}
        calls = Counter((job.parent / "calls.log").read_text().splitlines())
        print(f"rows: {rows}; preemptions: {len(resumes)}; lost {len(expected - set(ids))}, "
              f"repeated {sum(n - 1 for n in ids.values())}; steps run twice: {sum(n - 1 for n in calls.values())}")
        if resumes:
            resumes.sort()
            print(f"signal -> first new commit: median {resumes[len(resumes) // 2]:.1f} s, "
                  f"min {resumes[0]:.1f} s, max {resumes[-1]:.1f} s")


if __name__ == "__main__":
    main()
