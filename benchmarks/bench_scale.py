"""Scale: N workflows in flight at once (default 100,000) on a simulated engine, multi-turn.

The long-tail workload (benchmarks/longtail: 1-12 turns per row) with every row let in at once
(``max_in_flight`` = N; ``--steps-at-once`` of them run a step, the others wait in the talker's
inbox), against one simulated engine (``backend: sim``) that admits ``--engine-seqs`` requests at
once, all in one batch: a call lasts ``--call-s`` seconds of wall
time (``--tokens`` engine steps), plus the simulator's own Python time per step, so the tasks wait on
the "model" and stay in flight (the calls beyond the engine's admission wait in the client).

    1. ``matrix-hpc run`` in a session of its own; SIGUSR2 (a checkpoint) every ``--signal-s``;
    2. once a checkpoint has held (nearly) all N tasks and some rows are committed: kill -9 of
       every process of the session (driver, Ray's daemons, workers), as a node failure would;
    3. ``matrix-hpc resume RUN_DIR`` to the end; then every row must be committed exactly once
       (read back with the store API).

Prints the peak PSS of all the run's processes (psutil ``memory_full_info().pss`` summed over the
session), tasks/s, each checkpoint's size and time, and the resume's start-up and total time, with
the load average next to each figure. Everything about the engine is simulated; the runtime, Ray,
gRPC and the store are real.

Usage: python benchmarks/bench_scale.py [--rows 100000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import psutil
import yaml

from matrix_hpc import load_job
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from paper_sim import LONGTAIL, write_longtail_rows  # noqa: E402


def load() -> str:
    return "load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def prepare(out: Path, rows: int, call_s: float, tokens: int, checkpoint_s: float, engine_seqs: int,
            steps_at_once: int) -> Path:
    d = out / "longtail"
    shutil.copytree(LONGTAIL, d)
    write_longtail_rows(d / "rows.jsonl", rows)
    spec = yaml.safe_load((d / "job.yaml").read_text())
    spec["roles"]["talker"]["concurrency"] = steps_at_once
    spec["run"].update(max_in_flight=rows, output_dir="run", checkpoint_interval_s=checkpoint_s)
    # one batch holds every request admitted; only the per-step time counts, so a call lasts ~call_s
    sim = {"step_s": call_s / tokens, "prefill_token_s": 0, "decode_seq_s": 0, "kv_token_s": 0,
           "max_num_seqs": engine_seqs, "kv_cache_tokens": 10**9, "output_tokens": {"dist": "fixed", "mean": tokens}}
    spec["services"]["llm"]["smol"].update(sim=sim, max_concurrency=engine_seqs)
    (d / "job.yaml").write_text(yaml.safe_dump(spec))
    return d / "job.yaml"


def ideal_s(job_path: Path, call_s: float, engine_seqs: int) -> tuple[float, str]:
    """The resume's latency-bound time if the runtime cost nothing: the longest row's turns, or every
    call through the engine's admitted batch, whichever is longer."""
    turns = [json.loads(line)["turns"] for line in (job_path.parent / "rows.jsonl").open()]
    longest, through = max(turns) * call_s, sum(turns) / engine_seqs * call_s
    return max(longest, through), f"the longest row's {max(turns)} turns: {longest:.0f} s; {sum(turns)} calls " \
        f"through {engine_seqs} at a time: {through:.0f} s"


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
            if int(rest.rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def title(proc: psutil.Process) -> str:
    """A process's title (``ray::talker[...]``, ``raylet``, ``python``)."""
    return " ".join(proc.cmdline()[:1]).rsplit("/", 1)[-1][:40] or proc.name()


def session_pss(sid: int) -> dict[str, int]:
    """PSS by process title (``ray::talker``, ``raylet``, ...; one title may name several processes)."""
    by_title: Counter = Counter()
    for pid in session_pids(sid):
        try:
            p = psutil.Process(pid)
            by_title[title(p)] += p.memory_full_info().pss
        except (psutil.Error, OSError):
            pass
    return by_title


def biggest(by_title: dict[str, int], n: int = 4) -> str:
    return ", ".join(f"{title} {pss / 2**20:.0f} MiB" for title, pss in Counter(by_title).most_common(n))


def session_cpu(sid: int) -> float:
    total = 0.0
    for pid in session_pids(sid):
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except (psutil.Error, OSError):
            pass
    return total


class Watch:
    """Polls one session's PSS (peak, with the load average at the peak) on a thread."""

    def __init__(self, sid: int, every_s: float = 2.0):
        self.sid, self.every_s, self.peak, self.peak_load, self.peak_by = sid, every_s, 0, "", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            by_title = session_pss(self.sid)
            if sum(by_title.values()) > self.peak:
                self.peak, self.peak_load, self.peak_by = sum(by_title.values()), load(), by_title
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def store(run_dir: Path) -> RunStore | None:
    try:
        return RunStore.open(run_dir)
    except Exception:  # noqa: BLE001 - not created yet
        return None


def checkpoints(run_dir: Path) -> list[dict]:
    s = store(run_dir)
    return [e for e in s.events() if e["kind"] == "checkpoint"] if s else []


def run_until_full_checkpoint(job_path: Path, run_dir: Path, rows: int, timeout_s: float, signal_s: float) -> dict:
    """Start the run and ask for a checkpoint (SIGUSR2) every ``signal_s``; once one held >= 90% of the
    rows and some rows are committed, kill -9 its session. Return what was seen."""
    t0 = time.monotonic()
    proc = cli("run", str(job_path), "--no-progress", "--json")
    watch = Watch(proc.pid)
    full, seen, last_signal, args_signal_s = None, {}, time.monotonic(), signal_s
    try:
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise SystemExit(f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
            for e in checkpoints(run_dir):
                key = (e.get("time"), e["tasks"], e["seconds"])
                if key not in seen:
                    seen[key] = load()
                    print(f"  checkpoint: {e['tasks']} tasks in {e['seconds']:.2f} s ({seen[key]}; "
                          f"{e.get('bytes', 0) / 2**20:.0f} MiB)", flush=True)
                if e["tasks"] >= 0.9 * rows and full is None:
                    full = e
            if full is None and time.monotonic() - last_signal > args_signal_s and catches_sigusr2(proc.pid):
                os.kill(proc.pid, signal.SIGUSR2)  # a checkpoint now (as Slurm's preemption signal asks)
                last_signal = time.monotonic()
            committed = len(store(run_dir).committed()) if full else 0
            if full and committed > 0:
                cpu = session_cpu(proc.pid)
                kill_session(proc.pid)
                proc.wait()
                watch.stop()
                return {"full": full, "full_load": seen, "killed_at_s": time.monotonic() - t0,
                        "committed_at_kill": committed, "peak_pss": watch.peak, "peak_load": watch.peak_load,
                        "peak_by": watch.peak_by,
                        "cpu_s": cpu}
            time.sleep(1.0)
        raise SystemExit(f"no checkpoint of {rows} tasks within {timeout_s} s")
    finally:
        watch.stop()
        if proc.poll() is None:
            kill_session(proc.pid)


def catches_sigusr2(pid: int) -> bool:
    """Whether the driver has installed its SIGUSR2 handler (before, the signal would end it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGUSR2 - 1) & 1)
    return False


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def resume(run_dir: Path, timeout_s: float) -> dict:
    t0 = time.monotonic()
    proc = cli("resume", str(run_dir), "--no-progress", "--json")
    watch = Watch(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        watch.stop()
        if proc.poll() is None:
            kill_session(proc.pid)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"resume failed ({proc.returncode}):\n{out[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"summary": summary, "wall_s": wall, "peak_pss": watch.peak, "peak_load": watch.peak_load,
            "peak_by": watch.peak_by,
            "load_end": load()}


def exactly_once(run_dir: Path, rows: int) -> None:
    """Every row committed once, done, with every one of its turns."""
    ids, turns_ok = Counter(), 0
    for data in RunStore.open(run_dir).iter_results():
        t = task_pb2.Task.FromString(data)
        ids[t.task_id] += 1
        turns_ok += t.status == task_pb2.TASK_STATUS_DONE
    want = Counter({f"c{i}#0": 1 for i in range(rows)})
    assert ids == want, (f"rows committed: {sum(ids.values())} ({len(ids)} distinct) of {rows}; "
                         f"missing {len(want - ids)}, repeated {sum(1 for n in ids.values() if n > 1)}")
    assert turns_ok == rows, f"{rows - turns_ok} rows not done"


def on_slurm(job_path: Path, run_dir: Path, nodes: int, timeout_s: float) -> dict:
    """The same workload as a Slurm job of ``nodes`` nodes (``matrix-hpc submit``), one talker and one
    LLM replica per node, periodic checkpoints, run to its end: peak PSS of the job's processes on
    every node, checkpoints, and the rows per second from the first row sent to the run's end."""
    spec = yaml.safe_load(job_path.read_text())
    talker = spec["roles"]["talker"]
    talker.update(replicas=nodes, concurrency=-(-talker["concurrency"] // nodes))
    spec["services"]["llm"]["smol"]["replicas"] = nodes
    spec["run"]["checkpoint_interval_s"] = 30
    spec["slurm"] = {"nodes": nodes, "time_min": 60}
    job_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "MATRIX_HPC_NODE_LOCAL_PATHS": ""}  # every local "node" is this machine
    out = subprocess.run([sys.executable, "-m", "matrix_hpc.cli", "submit", str(job_path)], env=env,
                         capture_output=True, text=True, check=True).stdout
    job_id = re.search(r"submitted Slurm job (\d+)", out).group(1)
    peak, peak_by, t0 = 0, {}, time.monotonic()
    try:
        while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
            if time.monotonic() - t0 > timeout_s:
                raise SystemExit(f"Slurm job {job_id} still running after {timeout_s:.0f} s")
            by_title = job_pss(job_id)
            if sum(by_title.values()) > peak:
                peak, peak_by = sum(by_title.values()), by_title
            time.sleep(2.0)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    events = RunStore.open(run_dir).events()
    when = {e["kind"]: datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() for e in events}
    return {"job_id": job_id, "peak_pss": peak, "peak_by": peak_by,
            "checkpoints": [(e["tasks"], e["seconds"]) for e in events if e["kind"] == "checkpoint"],
            "processing_s": when["finished"] - when["sending"]}


def job_pss(job_id: str) -> dict[str, int]:
    """PSS by process title of every process of a Slurm job (found by ``SLURM_JOB_ID`` in its environment)."""
    by_title: Counter = Counter()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job_id:
                by_title[title(proc)] += proc.memory_full_info().pss
        except (psutil.Error, OSError):
            continue
    return by_title


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="workflows, all in flight at once")
    ap.add_argument("--call-s", type=float, default=5.0, help="simulated seconds per LLM call")
    ap.add_argument("--tokens", type=int, default=4, help="engine steps per call")
    ap.add_argument("--engine-seqs", type=int, default=16384, help="requests the engine admits at once")
    ap.add_argument("--steps-at-once", type=int, default=0,
                    help="the talker role's concurrency: steps running at once, the other workflows in flight "
                         "wait in its inbox (default: --engine-seqs, what the engine admits)")
    ap.add_argument("--checkpoint-s", type=float, default=3600.0, help="checkpoint_interval_s of the run")
    ap.add_argument("--signal-s", type=float, default=3.0, help="SIGUSR2 (a checkpoint) this often until one is full")
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--dir", default=f"/tmp/bench-scale-{os.getpid()}")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--slurm-nodes", type=int, default=0,
                    help="run it as a job of this many nodes on the local Slurm instead (no kill -9)")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True)
    engine_seqs = min(args.engine_seqs, args.rows)
    steps_at_once = min(args.steps_at_once or engine_seqs, args.rows)
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"{args.rows} rows all in flight, SIMULATED engine ({args.call_s} s per call, {engine_seqs} at once); "
          f"{steps_at_once} steps at once; {load()}", flush=True)
    try:
        job_path = prepare(out, args.rows, args.call_s, args.tokens, args.checkpoint_s, engine_seqs, steps_at_once)
        run_dir = load_job(job_path).run_dir
        if args.slurm_nodes:
            r = on_slurm(job_path, run_dir, args.slurm_nodes, args.timeout_s)
            exactly_once(run_dir, args.rows)
            print(f"slurm job {r['job_id']} on {args.slurm_nodes} nodes: {args.rows} rows done in "
                  f"{r['processing_s']:.1f} s from the first sent = {args.rows / r['processing_s']:.0f} tasks/s; "
                  f"checkpoints (tasks, s): {r['checkpoints']}; peak PSS {r['peak_pss'] / 2**30:.2f} GiB "
                  f"({biggest(r['peak_by'])}); {load()}; exactly once", flush=True)
            return 0
        first = run_until_full_checkpoint(job_path, run_dir, args.rows, args.timeout_s, args.signal_s)
        full = first["full"]
        print(f"run: checkpoint of {full['tasks']} in-flight tasks in {full['seconds']:.2f} s; kill -9 at "
              f"{first['killed_at_s']:.0f} s with {first['committed_at_kill']} rows committed; peak PSS "
              f"{first['peak_pss'] / 2**30:.2f} GiB ({first['peak_load']}; {biggest(first['peak_by'])}); "
              f"{first['cpu_s']:.0f} CPU-s", flush=True)
        res = resume(run_dir, args.timeout_s)
        s = res["summary"]
        startup = res["wall_s"] - s["processing_s"]
        print(f"resume: {s['resumed']} tasks restored, {s['done']} rows done in {res['wall_s']:.1f} s "
              f"({startup:.1f} s start-up and teardown, {s['processing_s']:.1f} s processing = "
              f"{s['done'] / max(s['processing_s'], 1e-9):.0f} tasks/s); peak PSS {res['peak_pss'] / 2**30:.2f} GiB "
              f"({res['peak_load']}; {biggest(res['peak_by'])}); {res['load_end']}; {s['retries']} step retries",
              flush=True)
        print("latency-bound ideal of the resume: {:.0f} s ({})".format(*ideal_s(job_path, args.call_s, engine_seqs)),
              flush=True)
        exactly_once(run_dir, args.rows)
        print(f"exactly once: all {args.rows} rows committed once, done (store API)", flush=True)
        print(json.dumps({"rows": args.rows, "checkpoint": full, "first": {k: v for k, v in first.items()
                          if k not in ("full", "full_load")}, "resume": res}, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
