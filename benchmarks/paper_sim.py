"""The paper's claim on a simulated GPU engine (``bench_paper.py --backend sim``).

One simulated engine (``backend: sim``, its default profile: Llama-3.1-8B on one H100, see
matrix_hpc/services/llm/backends/sim.py) serves both sides of every case, with the same rows, the
same agent code and the same seeds, so both sides ask for exactly the same tokens:

  matrix-hpc          the job run by the runtime, every task in flight at once;
  batch-synchronous   every live task does its current role's step together with all the others
                      at that role; the next role's batch waits for the slowest (a map_batches
                      pipeline over the job's roles, in the job file's order, until all are done).

Cases: each scenario job (rows repeated as trials up to the number in flight) and a long-tail
multi-turn workload (benchmarks/longtail: 1-12 turns per row, replies drawn from a lognormal with
a long tail). A line per case ends in ``matrix-hpc / batch-synchronous = X.XXx`` and gives each
side's mean engine batch (sequences decoded per engine step). Everything here is simulated: the
engine's time is the cost model's, the agents, runtime, gRPC and sandboxes are real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from matrix_hpc import DONE, load_job, run
from matrix_hpc.job.agents import resolve_agent
from matrix_hpc.job.dataset import iter_rows
from matrix_hpc.runtime.agent_actor import payload_class
from matrix_hpc.runtime.context import Context
from matrix_hpc.runtime.source import task_factory
from matrix_hpc.services.llm import LLMSpec
from matrix_hpc.services.llm import deploy as deploy_llm

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("collab_reasoning", "code_verify", "tool_use")
LONGTAIL = ROOT / "benchmarks" / "longtail"
LONGTAIL_SIM = {"output_tokens": {"dist": "lognormal", "mean": 160, "sigma": 1.2}}


@dataclass
class Side:
    tasks: int
    seconds: float
    steps: int
    batch_sum: int

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    @property
    def occupancy(self) -> float:
        return self.batch_sum / max(1, self.steps)


def write_longtail_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            turns = min(12, 1 + int(rng.expovariate(1 / 2.5)))  # most rows short, a few long
            f.write(json.dumps({"id": f"c{i}", "topic": f"topic {i}", "turns": turns}) + "\n")


def prepared_job(src: Path, in_flight: int, out: Path):
    """A copy of the job whose tasks number about ``in_flight`` (rows x trials), all let in at once."""
    d = out / src.name
    shutil.copytree(src, d)
    spec = yaml.safe_load((d / "job.yaml").read_text())
    if src == LONGTAIL:
        write_longtail_rows(d / "rows.jsonl", in_flight)
    rows = sum(1 for line in (d / spec["dataset"]["path"]).read_text().splitlines() if line.strip())
    trials = math.ceil(in_flight / rows)
    spec["dataset"].update(trials=trials)
    spec["dataset"].pop("limit", None)
    for role in spec["roles"].values():
        role["concurrency"] = rows * trials
    spec["run"].update(output_dir="run", max_in_flight=rows * trials)
    (d / "job.yaml").write_text(yaml.safe_dump(spec))
    return load_job(d / "job.yaml")


def tasks_of(job) -> list:
    """The task envelopes the runtime's source makes (its payload builder included), every trial."""
    factory = task_factory(job)
    return [factory.new(index, row, trial, where)
            for index, row, where in iter_rows(job.dataset_path, job.spec.dataset.limit)
            for trial in range(job.spec.dataset.trials)]


async def engine_counts(llm) -> tuple[int, int]:
    (info,) = await llm.client().model_info()
    assert info["backend"] == "sim", "the engine must be the simulator"
    return info["stats"]["steps"], info["stats"]["batch_sum"]


def batch_synchronous(job, services: dict, llm) -> Side:
    """Every live task steps with its role's batch; a role's batch waits for its slowest task."""
    cls, log = payload_class(job), logging.getLogger("bench")
    sys.path.insert(0, str(job.dir))
    step_fns = {name: resolve_agent(r.agent) for name, r in job.spec.roles.items()}
    live = []
    for task in tasks_of(job):
        payload = cls()
        task.payload.Unpack(payload)
        live.append([task, payload, job.spec.first_role])

    retry = job.spec.run.retry

    async def step(item):
        """One step, retried like the runtime retries it (the job's run.retry), from the same payload."""
        task, payload, role = item
        for attempt in range(retry.max_retries + 1):
            before = payload.SerializeToString()
            try:
                out = step_fns[role](payload, Context(task, role, services, log))
                item[2] = await out if asyncio.iscoroutine(out) else out
                break
            except Exception:
                if attempt == retry.max_retries:
                    raise
                payload.ParseFromString(before)
                await asyncio.sleep(retry.backoff_s * 2**attempt)
        task.step += 1

    async def go() -> Side:
        nonlocal live
        steps0, batch0 = await engine_counts(llm)
        t0, total = time.perf_counter(), len(live)
        while live:
            for role in step_fns:
                batch = [item for item in live if item[2] == role]
                if batch:
                    await asyncio.gather(*(step(item) for item in batch))
            finished = [item[0].task_id for item in live if item[2] == DONE]
            for sandbox in services.get("sandbox", {}).values():  # as the runtime does when it commits
                await sandbox.release(finished)
            live = [item for item in live if item[2] != DONE]
        seconds = time.perf_counter() - t0
        steps1, batch1 = await engine_counts(llm)
        return Side(total, seconds, steps1 - steps0, batch1 - batch0)

    try:
        return asyncio.run(go())
    finally:
        sys.path.remove(str(job.dir))
        sys.modules.pop("agents", None)  # every job names its module `agents`


def matrix(job, services: dict, llm) -> Side:
    steps0, batch0 = asyncio.run(engine_counts(llm))
    summary = run(job, progress=False, services=services)
    assert summary.failed == 0, f"{summary.failed} task(s) failed"
    steps1, batch1 = asyncio.run(engine_counts(llm))
    sys.modules.pop("agents", None)
    return Side(summary.done, summary.processing_s, steps1 - steps0, batch1 - batch0)


def job_services(job, llm, in_flight: int) -> tuple[dict, list]:
    """The simulated engine as the job's `smol`, and the job's own sandboxes, deployed once for both
    sides, with room for every task in flight to wait and hold a session (the batch side sends all at once)."""
    services, started = {"llm": {"smol": llm}}, []
    for name, spec in (job.spec.services.get("sandbox") or {}).items():
        from matrix_hpc.services.sandbox import SandboxSpec
        from matrix_hpc.services.sandbox import deploy as deploy_sandbox

        room = {"max_queue": 4 * in_flight, "max_sessions": 8 * in_flight}  # retried steps reopen sessions
        endpoint = deploy_sandbox(name, SandboxSpec.model_validate({**dict(spec), **room}), base_dir=job.dir)
        services.setdefault("sandbox", {})[name] = endpoint
        started.append(endpoint)
    return services, started


def one_case(name: str, src: Path, in_flight: int, sim: dict, tmp: Path) -> None:
    spec = LLMSpec(backend="sim", model="llama-3.1-8b-h100", sim=sim, max_concurrency=max(256, 2 * in_flight))
    llm = deploy_llm("smol", spec)
    try:
        a_job = prepared_job(src, in_flight, tmp / f"{name}-{in_flight}-a")
        b_job = prepared_job(src, in_flight, tmp / f"{name}-{in_flight}-b")
        services, started = job_services(a_job, llm, len(tasks_of(a_job)))
        try:
            b = batch_synchronous(b_job, services, llm)
            a = matrix(a_job, services, llm)
        finally:
            for endpoint in started:
                endpoint.shutdown()
    finally:
        llm.shutdown()
    print(f"{name:<17} {a.tasks:>5} in flight: matrix-hpc {a.rate:7.1f} tasks/s in {a.seconds:6.1f} s, "
          f"mean batch {a.occupancy:5.1f} ({a.steps} steps); batch-synchronous {b.rate:7.1f} tasks/s in "
          f"{b.seconds:6.1f} s, mean batch {b.occupancy:5.1f} ({b.steps} steps); "
          f"matrix-hpc / batch-synchronous = {a.rate / b.rate:.2f}x", flush=True)


def cases(scenario_rows: int, tool_use_rows: int, longtail: list[int]) -> list[tuple[str, Path, int, dict]]:
    # tool_use runs 3-6 sandboxed commands per task: on 2 cores, 256 at once exceed the sandbox's deadlines
    rows = {"tool_use": tool_use_rows}
    jobs = [(name, ROOT / "jobs" / name, rows.get(name, scenario_rows), {}) for name in SCENARIOS]
    return jobs + [("longtail", LONGTAIL, n, LONGTAIL_SIM) for n in longtail]


def main_sim(args, tmp: Path) -> int:
    from matrix_hpc.runtime.security import LocalRay

    print("SIMULATED engine (backend: sim, Llama-3.1-8B on one H100 as modelled); agents, runtime, "
          "gRPC and sandboxes are real", flush=True)
    with LocalRay(tmp, num_cpus=2, log_to_driver=False, object_store_memory=1024 * 1024**2):
        longtail = [int(x) for x in args.sim_longtail.split(",")]
        for name, src, n, sim in cases(args.sim_scenario_rows, args.sim_tool_use_rows, longtail):
            if args.sim_only and name not in args.sim_only.split(","):
                continue
            one_case(name, src, n, sim, tmp)
    return 0


if __name__ == "__main__":
    sys.exit("run it as: benchmarks/bench_paper.py --backend sim")
