"""One actor of a role's pool: an inbox, up to ``concurrency`` steps at once, and a router.

The actor keeps, for every task it holds, the message as it was before the current step, so
that a snapshot (or a retry) can always go back to a known state.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import sys
import time
import uuid
from collections import deque

from google.protobuf import descriptor_pool, message_factory

from matrix_hpc.job.agents import resolve_agent
from matrix_hpc.job.load import Job
from matrix_hpc.job.spec import DONE
from matrix_hpc.retry import backoff_s
from matrix_hpc.runtime.context import Context
from matrix_hpc.runtime.message import DONE_STATUS, Task, set_error, undeliverable
from matrix_hpc.runtime.nodes import output_to_run_dir, this_node
from matrix_hpc.runtime.router import Directory, Router, resolve
from matrix_hpc.runtime.step_threads import StepJob, StepThreads

_LATENCY_SAMPLES = 4096
SLOW_FACTOR = 20  # a step this many times its role's median latency is reported as slow
SLOW_MIN_S = 10.0
SERVICE_WAIT_S = 120.0  # how long a step waits for an unavailable service (a restarting replica)
SERVICE_BACKOFF_MAX_S = 5.0


class StepTimeout(TimeoutError):
    """A step ran past its role's ``step_timeout_s``."""


class UnknownRole(ValueError):
    """An agent named a next role the job does not have."""


def _defined_at(fn) -> str:
    """Where the agent that returned a wrong role is defined, as a traceback line."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        return f'  File "{inspect.getsourcefile(fn)}", line {inspect.getsourcelines(fn)[1]}, in {fn.__qualname__}\n'
    except (OSError, TypeError):
        return f"  in {getattr(fn, '__qualname__', repr(fn))}\n"


def payload_class(job: Job) -> type:
    """Import the job's generated payload modules and return the payload message class."""
    for path in reversed(job.import_paths()):
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in job.generated:
        __import__(name.removesuffix(".py"))
    desc = descriptor_pool.Default().FindMessageTypeByName(job.payload_type)
    return message_factory.GetMessageClass(desc)


GC_THRESHOLDS = (50_000, 20, 100)  # Python's default: (700, 10, 10)


class ActorBase:
    """What every runtime actor shares: identity, routing, pause/collect/resume for snapshots."""

    def __init__(self, job: Job, directory: Directory):
        self.incarnation = uuid.uuid4().hex
        self.frozen = False  # set by the final cut of a stop: no step starts, nothing is sent after it
        self.router = Router(directory, job.spec.run.large_payload_bytes, on_undeliverable=undeliverable)
        output_to_run_dir(job.run_dir)  # on a Slurm allocation: logs/node-<rank>.log, which outlives the job
        self.node = this_node()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    async def ping(self) -> str:
        return self.incarnation

    async def where(self) -> tuple[str, str]:
        """This incarnation and the Ray node it runs on."""
        import ray

        return self.incarnation, ray.get_runtime_context().get_node_id()

    async def pause(self) -> None:
        await self.router.pause()

    async def resume(self) -> None:
        self.router.resume()

    async def freeze(self) -> None:
        """The final cut of a stop: pause for good and start no step from now on (steps already
        running finish, their results stay unsent), so the checkpoint is the run's last state."""
        self.frozen = True
        await self.pause()


class AgentActor(ActorBase):
    def __init__(self, job: Job, role: str, directory: Directory, services: dict):
        super().__init__(job, directory)
        # An agent actor may hold 100,000 steps in flight, millions of live objects: with Python's
        # default thresholds it spent 40% of its time in full collections (benchmarks/README.md).
        gc.set_threshold(*GC_THRESHOLDS)
        self.role = role
        rs = job.spec.roles[role]
        self.concurrency = rs.concurrency
        self.timeout = rs.step_timeout_s
        self.retry = rs.retry or job.spec.run.retry
        self.roles = set(job.spec.roles) | {DONE}
        self.payload_cls = payload_class(job)
        self.agent_ref = rs.agent
        self.step_fn = resolve_agent(rs.agent)
        self.services = services
        self.logger = logging.getLogger(f"matrix_hpc.agent.{role}")
        self.inbox: deque[bytes] = deque()
        self.active: dict[str, bytes] = {}  # task id -> message before the running step
        self.steps = 0  # as run by this incarnation (a load figure; the store counts exactly)
        self.last_error: dict | None = None  # the latest failed try of a step, for `status`
        self.latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self.started: dict[str, tuple[int, float]] = {}  # task id -> (step, start) of running steps
        self.reported_slow: set[tuple[str, int]] = set()
        self.threads = StepThreads(f"{role}-step")  # where a synchronous agent's steps run
        self.abandoned: set[StepJob] = set()  # sync steps that ran past their timeout

    async def deliver(self, items: list) -> int:
        self.inbox.extend(await resolve(items))
        self._pump()
        return len(self.inbox) + len(self.active)

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self.inbox and len(self.active) < self.concurrency and not self.frozen:
            data = self.inbox.popleft()
            task = Task.FromString(data)
            self.active[task.task_id] = data
            loop.create_task(self._run(task, data))

    async def _run(self, task: Task, data: bytes) -> None:
        try:
            task = await self._step(task, data)
        except BaseException as e:  # noqa: BLE001 - a task never vanishes, whatever happened
            task = Task.FromString(data)
            set_error(task, self.role, e)
        finally:
            del self.active[task.task_id]
            self.started.pop(task.task_id, None)
            self.router.route(task.next_role, task.SerializeToString())
            self._pump()

    async def _step(self, task: Task, data: bytes) -> Task:
        """Run the step, retrying per policy; return the task as it leaves this actor."""
        attempt, waits, waited = 0, 0, 0.0
        while True:
            payload = self.payload_cls()
            task.payload.Unpack(payload)
            t0 = time.perf_counter()
            self.started[task.task_id] = (task.step, time.monotonic())
            try:
                nxt = await self._call(payload, Context(task, self.role, self.services, self.logger))
            except Exception as e:  # noqa: BLE001 - the job's code failed; retry per policy
                self.latencies.append(time.perf_counter() - t0)
                self.last_error = {"error": f"{type(e).__name__}: {e}"[:300], "role": self.role,
                                   "task_id": task.task_id, "step": task.step, "at": time.time()}
                more = await self._wait_for_service(e, waited)
                if more is not None:  # a service was down: try again, not counted as an attempt
                    waited = more
                    waits += 1
                    task = Task.FromString(data)
                    continue
                waited = SERVICE_WAIT_S  # the wait is spent once: from now on, it counts as a try
                attempt += 1
                if attempt > self.retry.max_retries:
                    task = Task.FromString(data)
                    set_error(task, self.role, e, attempts=attempt)
                    task.retries += attempt - 1
                    task.service_waits += waits
                    return task
                wait = backoff_s(attempt, base_s=self.retry.backoff_s, jitter=False)
                self.logger.info("role %s: step %d of task %s failed (%s: %s); try %d of %d in %.1fs", self.role,
                                 task.step, task.task_id, type(e).__name__, e, attempt + 1,
                                 self.retry.max_retries + 1, wait)
                await asyncio.sleep(wait)
                task = Task.FromString(data)
                continue
            self.latencies.append(time.perf_counter() - t0)
            self.steps += 1
            task.retries += attempt
            task.service_waits += waits
            if nxt not in self.roles:
                set_error(task, self.role, UnknownRole(
                    f"agent {self.agent_ref} returned {nxt!r}, which is not a role of this job (roles: "
                    f"{', '.join(sorted(self.roles - {DONE}))}; return matrix_hpc.DONE to finish the task)"))
                task.error.traceback = _defined_at(self.step_fn)
                return task
            task.payload.Pack(payload)
            task.step += 1
            task.next_role = nxt
            task.trace.append(self.role)
            if nxt == DONE:
                task.status = DONE_STATUS
            task.updated.GetCurrentTime()
            return task

    async def _wait_for_service(self, error: Exception, waited: float) -> float | None:
        """If ``error`` says a service is unavailable (a replica restarting), wait a moment and
        return the time waited so far; None once ``SERVICE_WAIT_S`` is spent, or for other errors."""
        if getattr(error, "code", None) != "UNAVAILABLE" or waited >= SERVICE_WAIT_S:
            return None
        pause = min(SERVICE_BACKOFF_MAX_S, max(0.5, waited))
        self.logger.warning("role %s: a service is unavailable (%s); trying again in %.1fs", self.role, error, pause)
        await asyncio.sleep(pause)
        return waited + pause

    async def _call(self, payload, ctx: Context):
        """One try of the step; a synchronous agent runs in a thread (``StepThreads``), so that its
        timeout holds, it does not stall the other steps of this actor, and a step that hangs past its
        timeout holds no slot another step needs (its thread is abandoned: Python cannot stop it)."""
        job = None
        if inspect.iscoroutinefunction(self.step_fn):
            result = self.step_fn(payload, ctx)
        else:
            job = self.threads.submit(self.step_fn, payload, ctx)
            result = job.future
        if not inspect.isawaitable(result):
            return result
        limit = asyncio.timeout(self.timeout)
        try:
            async with limit:
                result = await result
                if inspect.isawaitable(result):  # a sync function that returned a coroutine
                    result = await result
        except TimeoutError:
            if not limit.expired():  # the agent's own TimeoutError (a call of its that timed out)
                raise
            if job is not None and job.running:
                self._abandon(job, ctx)
            raise StepTimeout(f"step {ctx.step} of role {self.role!r} ran past its limit of "
                              f"{self.timeout:g}s (roles.{self.role}.step_timeout_s)") from None
        return result

    def _abandon(self, job: StepJob, ctx: Context) -> None:
        self.abandoned = {j for j in self.abandoned if j.running} | {job}
        self.logger.warning("role %s: step %d of task %s ran past its timeout and its thread still runs; the step "
                            "fails and its slot goes to the next one (%d such thread(s) alive in this actor)",
                            self.role, ctx.step, ctx.task_id, len(self.abandoned))

    def slow_steps(self) -> list[dict]:
        """Steps running far past this role's usual latency (each reported once)."""
        if len(self.latencies) < 10:
            return []
        usual = sorted(self.latencies)[len(self.latencies) // 2]
        limit = max(SLOW_FACTOR * usual, SLOW_MIN_S)
        now = time.monotonic()
        out = []
        for tid, (step, t0) in self.started.items():
            if now - t0 > limit and (tid, step) not in self.reported_slow:
                self.reported_slow.add((tid, step))
                out.append({"task_id": tid, "step": step, "running_s": round(now - t0, 1), "usual_s": usual})
        return out

    async def collect(self) -> list[bytes]:
        """Every message this actor holds: inbox, before-step copies of running steps, unsent."""
        return list(self.inbox) + list(self.active.values()) + self.router.pending()

    async def stats(self, latencies: bool = False, slow: bool = False) -> dict:
        out = {
            "incarnation": self.incarnation, "role": self.role, "inbox": len(self.inbox),
            "active": len(self.active), "steps": self.steps, "node": self.node, "last_error": self.last_error,
            "step_timeout_s": self.timeout, "abandoned_threads": sum(j.running for j in self.abandoned),
            "send_retries": self.router.send_retries,
            "sent_batches": self.router.sent_batches, "sent_messages": self.router.sent_messages,
        }
        if latencies:
            out["latencies"] = list(self.latencies)
        if slow:
            out["slow"] = self.slow_steps()
        return out
