"""matrix-hpc against the reference (fair-matrix 0.2.6) on the reference's own "coral" workflow.

Both sides run the coral dialogue with the reference's dummy agents (no LLM; ~1 KiB replies; the
matcher agrees with 10% chance before its 3rd rating, 90% from it), the same rows, all of them in
flight at once, one after the other in this session, each end to end from its command's start
(Ray start-up included) to its exit:

  reference   ``python -m matrix.agents.p2p_agents --config-name=coral_mmlu_pro_dummy`` in a venv
              of its own (made here with ``python3 -m venv`` + ``pip install fair-matrix[agent]==0.2.6
              'ray[default]<2.56'`` unless it exists), on a local Ray it starts itself (RAY_ADDRESS=local);
  matrix-hpc  ``matrix-hpc run benchmarks/coral/job.yaml`` (the same agents, benchmarks/coral).

Prints tasks/s for both, their ratio, and CPU-seconds per hop for both (the CPU time of every
process of each command's session, sampled every 0.5 s: a slight undercount of the last half
second). If the reference cannot be installed or run, says exactly why and measures ours alone.

Usage: python benchmarks/bench_reference.py [--rows 10000] [--venv /tmp/matrix-ref-venv] [--skip-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
CORAL = ROOT / "benchmarks" / "coral"
# Its `ray` extra pulls s3fs/aiobotocore (pip backtracks for minutes; coral needs neither). Ray 2.56
# removed `ray.put(_owner=...)`, which its agents use: with a newer Ray every task fails at once.
REFERENCE = ["fair-matrix[agent]==0.2.6", "ray[default]<2.56"]
PROBE = ("import sys, matrix.agents.p2p_agents, ray; "
         "sys.exit(f'ray {ray.__version__}' if tuple(map(int, ray.__version__.split('.')[:2])) >= (2, 56) else 0)")


def load() -> str:
    return "load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


class SessionCPU:
    """CPU seconds of every process of one session (the highest figure seen per process)."""

    def __init__(self, sid: int):
        self.sid, self.by_pid = sid, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for p in psutil.process_iter(["pid"]):
                try:
                    if os.getsid(p.pid) == self.sid:
                        t = p.cpu_times()
                        self.by_pid[p.pid] = max(self.by_pid.get(p.pid, 0.0), t.user + t.system)
                except (psutil.Error, OSError):
                    continue
            self._stop.wait(0.5)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.by_pid.values())


def timed(cmd: list[str], cwd: Path, env: dict, timeout_s: float) -> tuple[float, float, str, int]:
    """Run ``cmd`` in a session of its own: (wall seconds, CPU seconds of the session, output, exit status)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    cpu = SessionCPU(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out = f"timed out after {timeout_s} s"
    finally:
        for p in psutil.process_iter(["pid"]):  # what the command left behind (Ray's daemons)
            try:
                if os.getsid(p.pid) == proc.pid:
                    p.kill()
            except (psutil.Error, OSError):
                continue
        proc.wait()
    return time.monotonic() - t0, cpu.stop(), out, proc.returncode


def write_rows(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            options = [f"option {j} of question {i}" for j in range(10)]
            f.write(json.dumps({"question_id": f"q{i}", "question": f"What is the answer to question {i}?",
                                "options": options, "answer": "ABCDEFGHIJ"[rng.randrange(10)],
                                "category": "bench"}) + "\n")


def reference_venv(venv: Path) -> str | None:
    """The reference's venv, made if missing; None when ready, else why it could not be."""
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run(["python3", "-m", "venv", str(venv)],
                              capture_output=True, text=True)
        if made.returncode:
            return f"python3 -m venv {venv} failed: {made.stderr.strip()[-500:]}"
    probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    got = subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE], capture_output=True, text=True)
    if got.returncode:
        return f"pip install {' '.join(REFERENCE)} failed: {got.stderr.strip()[-800:]}"
    probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"the reference does not import: {probe.stderr.strip()[-800:]}"


def run_reference(venv: Path, rows_file: Path, rows: int, work: Path, timeout_s: float) -> dict:
    out_file = work / "reference_results.jsonl"
    cmd = [str(venv / "bin" / "python"), "-m", "matrix.agents.p2p_agents", "--config-name=coral_mmlu_pro_dummy",
           f"max_concurrent_tasks={rows}", f"dataset.cut_off={rows}", "dataset.name=json", "dataset.split=train",
           f"dataset.data_files={rows_file}", f"output.path={out_file}", f"hydra.run.dir={work / 'hydra'}",
           # its actors ask for 5.5 CPUs (sink 2, agents 1, matcher 0.5): fit them in this machine's 2
           *(f"agents.{a}.ray_resources.num_cpus=0.4"
             for a in ("_sink", "teacher", "student", "answer_extractor", "answer_matcher"))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(RAY_ADDRESS="local", RAY_USAGE_STATS_ENABLED="0")
    before = load()
    wall, cpu, out, rc = timed(cmd, work, env, timeout_s)
    done = sum(1 for _ in out_file.open()) if out_file.exists() else 0
    if rc != 0 or done < rows:
        raise RuntimeError(f"the reference exited {rc} with {done} of {rows} rows written:\n{out[-3000:]}")
    # its history starts with the injected first message (no agent ran it): not a hop
    hops = sum(len(json.loads(line).get("history") or []) - 1 for line in out_file.open())
    if hops < rows:
        first = out_file.open().readline()[:600]
        raise RuntimeError(f"the reference wrote {done} rows but ran {hops} agent hops (a dialogue has several): "
                           f"its rows are not dialogues. The first: {first}")
    return {"tasks": done, "wall_s": wall, "cpu_s": cpu, "hops": hops, "load_before": before, "load_after": load()}


def run_ours(rows_file: Path, rows: int, work: Path, timeout_s: float) -> dict:
    job_dir = work / "coral"
    shutil.copytree(CORAL, job_dir)
    shutil.copy(rows_file, job_dir / "rows.jsonl")
    spec = yaml.safe_load((job_dir / "job.yaml").read_text())
    for role in spec["roles"].values():
        role["concurrency"] = rows
    spec["run"]["max_in_flight"] = rows
    (job_dir / "job.yaml").write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "matrix_hpc.cli", "run", str(job_dir / "job.yaml"), "--no-progress", "--json"]
    before = load()
    wall, cpu, out, rc = timed(cmd, work, dict(os.environ), timeout_s)
    if rc != 0:
        raise RuntimeError(f"matrix-hpc exited {rc}:\n{out[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["done"] == rows, summary
    return {"tasks": summary["done"], "wall_s": wall, "cpu_s": cpu, "hops": sum(summary["steps"].values()),
            "processing_s": summary["processing_s"], "load_before": before, "load_after": load()}


def line(name: str, r: dict) -> str:
    rate = r["tasks"] / r["wall_s"]
    return (f"{name:<11} {r['tasks']} tasks in {r['wall_s']:.1f} s end to end = {rate:,.1f} tasks/s; "
            f"{r['cpu_s']:.1f} CPU-s, {r['hops']} hops, {1e3 * r['cpu_s'] / max(r['hops'], 1):.2f} CPU-ms per hop "
            f"({r['load_before']} before, {r['load_after']} after)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000, help="rows, all in flight at once")
    ap.add_argument("--venv", default="/tmp/matrix-ref-venv", help="the reference's venv (made if missing)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=1800)
    args = ap.parse_args()
    work = Path(f"/tmp/bref-{os.getpid()}")  # short: Ray socket paths must fit 107 bytes
    work.mkdir()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"coral, dummy agents, {args.rows} rows all in flight; {load()}", flush=True)
    try:
        rows_file = work / "rows.jsonl"
        write_rows(rows_file, args.rows)
        ref, why = None, "skipped (--skip-reference)" if args.skip_reference else reference_venv(Path(args.venv))
        if why is None:
            try:
                ref = run_reference(Path(args.venv), rows_file, args.rows, work, args.timeout_s)
                print(line("reference", ref), flush=True)
            except RuntimeError as e:
                why = str(e)
        if why:
            print(f"reference: not measured: {why}", flush=True)
        ours = run_ours(rows_file, args.rows, work, args.timeout_s)
        print(line("matrix-hpc", ours) + f"; {ours['tasks'] / ours['processing_s']:,.0f} tasks/s processing only",
              flush=True)
        if ref:
            ratio = (ours["tasks"] / ours["wall_s"]) / (ref["tasks"] / ref["wall_s"])
            print(f"matrix-hpc / reference = {ratio:.1f}x tasks/s end to end (target 100x); CPU-s "
                  f"{ours['cpu_s']:.1f} against {ref['cpu_s']:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
