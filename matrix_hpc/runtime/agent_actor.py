"""One actor of a role's pool: an inbox, up to ``concurrency`` steps at once, and a router.

The actor keeps, for every task it holds, the message as it was before the current step, so
that a snapshot (or a retry) can always go back to a known state.
"""

from __future__ import annotations

import asyncio
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
from matrix_hpc.runtime.context import Context
from matrix_hpc.runtime.message import DONE_STATUS, Task, set_error
from matrix_hpc.runtime.router import Directory, Router, resolve

_LATENCY_SAMPLES = 4096


def payload_class(job: Job) -> type:
    """Import the job's generated payload modules and return the payload message class."""
    for path in reversed(job.import_paths()):
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in job.generated:
        __import__(name.removesuffix(".py"))
    desc = descriptor_pool.Default().FindMessageTypeByName(job.payload_type)
    return message_factory.GetMessageClass(desc)


class ActorBase:
    """What every runtime actor shares: identity, routing, pause/collect/resume for snapshots."""

    def __init__(self, job: Job, directory: Directory):
        self.incarnation = uuid.uuid4().hex
        self.router = Router(directory, job.spec.run.large_payload_bytes)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    async def ping(self) -> str:
        return self.incarnation

    async def pause(self) -> None:
        await self.router.pause()

    async def resume(self) -> None:
        self.router.resume()


class AgentActor(ActorBase):
    def __init__(self, job: Job, role: str, directory: Directory, services: dict):
        super().__init__(job, directory)
        self.role = role
        rs = job.spec.roles[role]
        self.concurrency = rs.concurrency
        self.timeout = rs.step_timeout_s
        self.retry = rs.retry or job.spec.run.retry
        self.roles = set(job.spec.roles) | {DONE}
        self.payload_cls = payload_class(job)
        self.step_fn = resolve_agent(rs.agent)
        self.services = services
        self.logger = logging.getLogger(f"matrix_hpc.agent.{role}")
        self.inbox: deque[bytes] = deque()
        self.active: dict[str, bytes] = {}  # task id -> message before the running step
        self.steps = self.failures = self.retries = 0
        self.latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)

    async def deliver(self, items: list) -> int:
        self.inbox.extend(await resolve(items))
        self._pump()
        return len(self.inbox) + len(self.active)

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self.inbox and len(self.active) < self.concurrency:
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
            self.router.route(task.next_role, task.SerializeToString())
            self._pump()

    async def _step(self, task: Task, data: bytes) -> Task:
        """Run the step, retrying per policy; return the task as it leaves this actor."""
        attempt = 0
        while True:
            payload = self.payload_cls()
            task.payload.Unpack(payload)
            t0 = time.perf_counter()
            try:
                nxt = await self._call(payload, Context(task, self.role, self.services, self.logger))
            except Exception as e:  # noqa: BLE001 - the job's code failed; retry per policy
                attempt += 1
                self.latencies.append(time.perf_counter() - t0)
                if attempt > self.retry.max_retries:
                    self.failures += 1
                    task = Task.FromString(data)
                    set_error(task, self.role, e, attempts=attempt)
                    return task
                self.retries += 1
                await asyncio.sleep(self.retry.backoff_s * 2 ** (attempt - 1))
                task = Task.FromString(data)
                continue
            self.latencies.append(time.perf_counter() - t0)
            self.steps += 1
            if nxt not in self.roles:
                set_error(task, self.role, f"agent returned {nxt!r}, which is not a role of this job "
                          f"({', '.join(sorted(self.roles))})")
                return task
            task.payload.Pack(payload)
            task.step += 1
            task.next_role = nxt
            task.trace.append(self.role)
            if nxt == DONE:
                task.status = DONE_STATUS
            task.updated.GetCurrentTime()
            return task

    async def _call(self, payload, ctx: Context):
        result = self.step_fn(payload, ctx)
        if inspect.isawaitable(result):
            result = await (asyncio.wait_for(result, self.timeout) if self.timeout else result)
        return result

    async def collect(self) -> list[bytes]:
        """Every message this actor holds: inbox, before-step copies of running steps, unsent."""
        return list(self.inbox) + list(self.active.values()) + self.router.pending()

    async def stats(self, latencies: bool = False) -> dict:
        out = {
            "incarnation": self.incarnation, "role": self.role, "inbox": len(self.inbox),
            "active": len(self.active), "steps": self.steps, "failures": self.failures, "retries": self.retries,
            "sent_batches": self.router.sent_batches, "sent_messages": self.router.sent_messages,
        }
        if latencies:
            out["latencies"] = list(self.latencies)
        return out
