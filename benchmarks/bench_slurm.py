"""Slurm figures on the local Slurm of slurm/ (start it first, or run through slurm/with-local-slurm.sh):

- submit -> first committed row (2 nodes: Slurm scheduling, Ray head + worker, actors, first row);
- preemption signal -> the requeued job's first new commit (checkpoint, requeue, bootstrap, resume);
- rows lost and rows repeated across N preemptions in a row of one run (must be 0 and 0), and
  steps run twice (0: every task continued from its saved step).

Usage: .venv/bin/python benchmarks/bench_slurm.py [--preemptions 10]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matrix_hpc._gen.v1 import task_pb2  # noqa: E402
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


def attempt(run_dir: Path, job_id: str) -> int:
    """The latest start of the job (its requeue count), from the bootstrap's folders."""
    return max((int(p.name.split(".")[1]) for p in (run_dir / "slurm" / "ray").glob(f"{job_id}.*")), default=-1)


def _log_time(line: str) -> float:
    """The wall-clock time of a log line ("2026-12-05 17:03:31,084 ...")."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def breakdown(run_dir: Path, job_id: str, requeue: int, signal_at: float, commit_at: float) -> dict[str, float]:
    """Where the time from the preemption signal to the first new commit went, from node 0's log
    and the run's events: the requeue and Slurm (until node 0's task starts), Ray (head up, driver
    connected, every node joined), the store opened, then services, actors and the first row."""
    lines = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text(errors="replace").splitlines()
    start = max(i for i, ln in enumerate(lines) if f"job {job_id}, requeue {requeue}" in ln)
    after = lines[start:]
    t_start = _log_time(after[0])
    t_connected = next(_log_time(ln) for ln in after if "Connected to Ray cluster" in ln)
    t_joined = next(_log_time(ln) for ln in after if "node(s) joined Ray" in ln)
    events = [json.loads(ln) for ln in (run_dir / "logs" / "events.jsonl").read_text().splitlines()]
    t_resumed = next(t for t in (_event_time(e) for e in events if e["kind"] == "resumed") if t >= t_joined)
    return {"stop, requeue, wait for nodes": t_start - signal_at,
            "Ray head up, driver connected": t_connected - t_start, "other nodes joined": t_joined - t_connected,
            "store opened": t_resumed - t_joined, "actors, first row": commit_at - t_resumed}


def _event_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preemptions", type=int, default=10)
    p.add_argument("--keep", type=Path, help="run in this (new) folder and keep it, logs included")
    args = p.parse_args()
    env = {**os.environ, "MATRIX_HPC_NODE_LOCAL_PATHS": ""}  # every local "node" is this machine
    rows = 60 * (args.preemptions + 2)
    if args.keep:
        args.keep.mkdir(parents=True)
    folder = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="bench-slurm-")
    with folder as tmp:
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
                last = attempt(run_dir, job_id)
                signal_wall = time.time()
                signal_at = preempt()
                wait_until(lambda a=last: attempt(run_dir, job_id) > a, 600, "the requeue", job_id)
                # Counted once the stopped job is gone: it commits the rows that finish while it stops.
                before = committed(run_dir)
                new = wait_until(lambda b=before: committed(run_dir) > b, 600, "a new commit after the requeue", job_id)
                resumes.append(new - signal_at)
                now = attempt(run_dir, job_id)
                parts = breakdown(run_dir, job_id, now, signal_wall, time.time() - (time.monotonic() - new))
                print(f"preemption {i + 1}: signal -> requeued job's first new commit {resumes[-1]:.1f} s ("
                      + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")"
                      + (f" [requeued {now - last} times: another job preempted it too]" if now > last + 1 else ""))
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
