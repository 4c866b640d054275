"""The source: turns dataset rows into tasks while keeping at most ``max_in_flight`` of them
between itself and a durable commit (backpressure: nothing upstream of a commit is unbounded).

It also remembers the last known message of every task in flight (the initial one, updated by
each snapshot), which is what a task restarts from if the actor holding it dies.

If the source itself dies, Ray restarts it idle: it sends nothing until the driver hands it,
in ``adopt``, what the rest of the run holds (a consistent cut) and what is committed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from matrix_hpc.job.agents import resolve_ref
from matrix_hpc.job.dataset import iter_rows
from matrix_hpc.job.load import Job
from matrix_hpc.runtime.agent_actor import ActorBase, payload_class
from matrix_hpc.runtime.message import Task, TaskFactory, task_id
from matrix_hpc.runtime.router import Directory


def task_factory(job: Job) -> TaskFactory:
    """What turns the job's dataset rows into task envelopes: its payload class and builder."""
    cls = payload_class(job)  # also puts the job's folders on sys.path, for the builder
    builder = resolve_ref(job.spec.payload.builder) if job.spec.payload.builder else None
    return TaskFactory(job.spec, cls, builder)


class SourceActor(ActorBase):
    def __init__(self, job: Job, directory: Directory, skip: set[str], restore: list[bytes]):
        super().__init__(job, directory)
        self.factory = task_factory(job)
        self.job = job
        self.skip = skip
        self.restore = deque(restore)
        self.max_in_flight = job.spec.run.max_in_flight
        self.known: dict[str, bytes] = {}  # task id -> last known message, for every task in flight
        self.tasks = self._tasks()
        self.exhausted = False
        self.started = False  # a restarted source waits for adopt() before sending anything
        self.emitted = self.skipped = self.finished_count = 0

    def _tasks(self) -> Iterator[tuple[str, str, bytes]]:
        """(task id, next role, message) of every task still to send: restored ones first."""
        while self.restore:
            data = self.restore.popleft()
            task = Task.FromString(data)
            yield task.task_id, task.next_role, data
        trials, rows = self.job.spec.dataset.trials, self.job.rows
        for index, row, where in iter_rows(self.job.dataset_path, self.job.spec.dataset.limit):
            rid = self.factory.row_id(index, row)
            for trial in range(trials):
                if rows is not None and (index, trial) not in rows:
                    continue  # a rerun: not one of its rows
                if task_id(rid, trial) in self.skip:
                    self.skipped += 1
                    continue
                task = self.factory.new(index, row, trial, where)
                yield task.task_id, task.next_role, task.SerializeToString()

    async def start(self) -> None:
        self.started = True
        self._pump()

    async def adopt(self, in_flight: list[bytes], restore: list[bytes], skip: list[str]) -> None:
        """Take over a run after a restart: ``in_flight`` are the tasks other actors hold (a cut),
        ``restore`` the saved state of tasks lost with the old source, ``skip`` every task id
        committed or in flight, which the dataset pass must not send again."""
        self.known = {Task.FromString(m).task_id: m for m in in_flight}
        self.restore = deque(restore)
        self.skip = set(skip)
        self.tasks = self._tasks()
        self.exhausted = False
        self.started = True
        self._pump()

    def _pump(self) -> None:
        while self.started and not self.frozen and not self.exhausted and len(self.known) < self.max_in_flight:
            item = next(self.tasks, None)
            if item is None:
                self.exhausted = True
                return
            tid, role, data = item
            self.known[tid] = data
            self.emitted += 1
            self.router.route(role, data)

    async def finished(self, ids: list[str]) -> None:
        """Sinks report tasks committed durably: they no longer count as in flight."""
        for tid in ids:
            if self.known.pop(tid, None) is not None:
                self.finished_count += 1
        self._pump()

    async def remember(self, messages: list[bytes]) -> None:
        """A snapshot's messages become the last known state of their tasks."""
        for data in messages:
            tid = Task.FromString(data).task_id
            if tid in self.known:
                self.known[tid] = data

    async def reinject(self, ids: list[str]) -> int:
        """Send lost tasks again, from their last known message."""
        sent = 0
        for tid in ids:
            data = self.known.get(tid)
            if data is not None:
                self.router.route(Task.FromString(data).next_role, data)
                sent += 1
        return sent

    async def collect(self) -> dict:
        return {"outstanding": list(self.known), "pending": self.router.pending()}

    async def stats(self) -> dict:
        return {
            "incarnation": self.incarnation, "emitted": self.emitted, "in_flight": len(self.known),
            "exhausted": self.exhausted, "started": self.started, "skipped": self.skipped,
            "finished": self.finished_count,
        }
