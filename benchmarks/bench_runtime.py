"""Task runtime benchmark: hops/s with no-op agents, memory at 10,000 tasks in flight, and
throughput under heavy-tailed step latency against two baselines on the same actors:

- batch-synchronous: rows run in batches of C; a batch starts when the previous one is done;
- central orchestrator: one asyncio loop drives every task, one actor call per step.

Usage: python benchmarks/bench_runtime.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import ray  # noqa: E402

from matrix_hpc import load_job, run  # noqa: E402
from matrix_hpc.runtime.message import Task  # noqa: E402
from matrix_hpc.runtime.security import LocalRay  # noqa: E402

HOPS = 6
PROTO = 'syntax = "proto3";\npackage bench;\nmessage Item {\n  string text = 1;\n  int64 n = 2;\n}\n'
AGENTS = '''
import asyncio, math, random
from matrix_hpc import DONE

HOPS = {hops}
MEDIAN_S = {median}
SIGMA = {sigma}

def latency(task_id, step):
    return random.Random(f"{{task_id}}/{{step}}").lognormvariate(math.log(MEDIAN_S), SIGMA) if MEDIAN_S else 0.0

async def hop(item, ctx):
    delay = latency(ctx.task_id, ctx.step)
    if delay:
        await asyncio.sleep(delay)
    return DONE if ctx.step + 1 >= HOPS else f"hop{{ctx.step + 1}}"
'''


def make_job(root: Path, name: str, rows: int, *, median: float, sigma: float, in_flight: int,
             replicas: int = 1, checkpoint_s: float = 3600) -> Path:
    d = root / name
    d.mkdir()
    (d / "item.proto").write_text(PROTO)
    (d / "agents.py").write_text(AGENTS.format(hops=HOPS, median=median, sigma=sigma))
    (d / "data.jsonl").write_text("".join(json.dumps({"n": i}) + "\n" for i in range(rows)))
    roles = {f"hop{i}": {"agent": "agents:hop", "replicas": replicas, "concurrency": 20000} for i in range(HOPS)}
    spec = {"name": name, "dataset": {"path": "data.jsonl"}, "payload": {"proto": "item.proto", "type": "bench.Item"},
            "roles": roles, "first_role": "hop0",
            "run": {"max_in_flight": in_flight, "output_dir": "out", "checkpoint_interval_s": checkpoint_s}}
    (d / "job.yaml").write_text(json.dumps(spec))
    return d / "job.yaml"


def ray_rss() -> int:
    """Resident memory of this Ray's processes (raylet, GCS, workers), in bytes."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def bench_noop(root: Path, rows: int, checkpoint_s: float = 3600) -> dict:
    name = "noop" if checkpoint_s >= 3600 else "noop_ckpt"
    job = load_job(make_job(root, name, rows, median=0, sigma=0, in_flight=5000, checkpoint_s=checkpoint_s))
    s = run(job, progress=False)
    again = run(job, progress=False)  # a resume of the finished run: every row committed, all skipped
    return {"tasks": s.done, "seconds": round(s.processing_s, 2), "hops_per_s": round(s.done * HOPS / s.processing_s),
            "tasks_per_s": round(s.done / s.processing_s), "checkpoints": s.checkpoints,
            "resume_s": round(again.wall_s, 2), "resume_skip_s": round(again.processing_s, 2)}


def bench_memory(root: Path, in_flight: int) -> dict:
    """Peak memory with ``in_flight`` tasks parked in agents, minus the same run with 10."""
    peaks, snapshot = {}, {}
    for n in (10, in_flight):
        job = load_job(make_job(root, f"mem{n}", n, median=3.0, sigma=0.0, in_flight=n))
        peak = [0]

        def watch(r, peak=peak, n=n):
            import threading

            def poll():
                while True:
                    try:
                        st = ray.get(r.source.stats.remote())
                    except ray.exceptions.RayActorError:
                        return
                    peak[0] = max(peak[0], ray_rss())
                    if n == in_flight and st["in_flight"] == n and not snapshot:
                        t0 = time.perf_counter()
                        snapshot["tasks"] = r.recovery.checkpoint()
                        snapshot["seconds"] = round(time.perf_counter() - t0, 3)
                    if st["exhausted"] and st["in_flight"] == 0:
                        return
                    time.sleep(0.2)

            threading.Thread(target=poll, daemon=True).start()

        run(job, progress=False, on_start=watch)
        peaks[n] = peak[0]
    return {"in_flight": in_flight, "added_mib": round((peaks[in_flight] - peaks[10]) / 2**20),
            "peak_mib": round(peaks[in_flight] / 2**20), "snapshot": snapshot}


@ray.remote
class StepActor:
    """The baselines' agents: the same agent code, called once per step."""

    def __init__(self, job):
        from matrix_hpc.job.agents import resolve_agent
        from matrix_hpc.runtime.agent_actor import payload_class

        self.cls = payload_class(job)
        self.fn = resolve_agent(job.spec.roles["hop0"].agent)

    async def step(self, data: bytes) -> bytes:
        from matrix_hpc.runtime.context import Context

        t = Task.FromString(data)
        p = self.cls()
        t.payload.Unpack(p)
        t.next_role = await self.fn(p, Context(t, "hop", {}, None))
        t.payload.Pack(p)
        t.step += 1
        return t.SerializeToString()


def _tasks(rows: int) -> list[bytes]:
    return [Task(task_id=f"{i}#0", row_index=i).SerializeToString() for i in range(rows)]


async def _drive(actors, data: bytes) -> bytes:
    for hop in range(HOPS):
        data = await actors[hop].step.remote(data)
    return data


async def batch_synchronous(actors, rows: int, concurrency: int) -> float:
    tasks, t0 = _tasks(rows), time.perf_counter()
    for i in range(0, rows, concurrency):
        await asyncio.gather(*(_drive(actors, d) for d in tasks[i:i + concurrency]))
    return time.perf_counter() - t0


async def central_orchestrator(actors, rows: int, concurrency: int) -> float:
    tasks, t0 = _tasks(rows), time.perf_counter()
    gate = asyncio.Semaphore(concurrency)

    async def one(d):
        async with gate:
            await _drive(actors, d)

    await asyncio.gather(*(one(d) for d in tasks))
    return time.perf_counter() - t0


def bench_heavy_tail(root: Path, rows: int, concurrency: int, median: float, sigma: float) -> dict:
    job = load_job(make_job(root, "tail", rows, median=median, sigma=sigma, in_flight=concurrency))
    s = run(job, progress=False)
    out = {"rows": rows, "concurrency": concurrency, "median_s": median, "sigma": sigma,
           "matrix_tasks_per_s": round(s.done / s.processing_s, 2)}
    actors = [StepActor.options(max_concurrency=20000).remote(job) for _ in range(HOPS)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    for name, fn in (("batch", batch_synchronous), ("central", central_orchestrator)):
        seconds = asyncio.run(fn(actors, rows, concurrency))
        out[f"{name}_tasks_per_s"] = round(rows / seconds, 2)
    noop = load_job(make_job(root, "central_noop", 1, median=0, sigma=0, in_flight=1))
    quick = [StepActor.options(max_concurrency=20000).remote(noop) for _ in range(HOPS)]
    seconds = asyncio.run(central_orchestrator(quick, 3000, 1000))
    out["central_noop_hops_per_s"] = round(3000 * HOPS / seconds)
    for a in actors + quick:
        ray.kill(a)
    out["matrix_vs_batch"] = round(out["matrix_tasks_per_s"] / out["batch_tasks_per_s"], 2)
    out["matrix_vs_central"] = round(out["matrix_tasks_per_s"] / out["central_tasks_per_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    ap.add_argument("--median", type=float, default=0.2, help="median step latency (s) of the heavy-tail run")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"python {platform.python_version()}, ray {ray.__version__}")
    # The Ray a run starts itself: loopback only, token auth
    with tempfile.TemporaryDirectory() as tmp, LocalRay(tmp, object_store_memory=512 * 2**20, log_to_driver=False):
        root = Path(tmp)
        noop = bench_noop(root, 5000 if args.quick else 100_000)
        print(f"no-op, {HOPS} hops: {noop['tasks']} tasks in {noop['seconds']}s = {noop['hops_per_s']} hops/s "
              f"({noop['tasks_per_s']} tasks/s)")
        print(f"resume of that finished {noop['tasks']}-row run: {noop['resume_s']}s in all "
              f"({noop['resume_skip_s']}s to skip the committed rows, the rest is Ray actor start-up)")
        ckpt = bench_noop(root, 5000 if args.quick else 100_000, checkpoint_s=0.5)
        print(f"same with a checkpoint every 0.5s: {ckpt['tasks_per_s']} tasks/s, {ckpt['checkpoints']} checkpoints "
              f"({ckpt['tasks_per_s'] / noop['tasks_per_s']:.2f}x of without)")
        mem = bench_memory(root, 2000 if args.quick else 10000)
        print(f"{mem['in_flight']} tasks in flight: +{mem['added_mib']} MiB (peak {mem['peak_mib']} MiB for Ray); "
              f"checkpoint of {mem['snapshot'].get('tasks')} tasks: {mem['snapshot'].get('seconds')}s")
        # Enough rows that the run measures throughput, not the drain of its single slowest task.
        tail = bench_heavy_tail(root, 600 if args.quick else 3000, 50 if args.quick else 200, args.median, 1.0)
        print(f"heavy tail (lognormal median {tail['median_s']}s sigma {tail['sigma']}, {HOPS} hops, "
              f"{tail['rows']} rows at concurrency {tail['concurrency']}):")
        print(f"  matrix {tail['matrix_tasks_per_s']} tasks/s, batch-synchronous {tail['batch_tasks_per_s']}, "
              f"central orchestrator {tail['central_tasks_per_s']}")
        print(f"  matrix/batch = {tail['matrix_vs_batch']}x, matrix/central = {tail['matrix_vs_central']}x")
        print(f"central orchestrator with no-op agents: {tail['central_noop_hops_per_s']} hops/s")
        print(json.dumps({"noop": noop, "noop_checkpointing": ckpt, "memory": mem, "heavy_tail": tail}))


if __name__ == "__main__":
    main()
