"""A sink: receives finished tasks, commits them to the run store in chunks, then tells the
source (which frees their places in flight). Each sink owns its own writer in the store.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import ray

from matrix_hpc.job.load import Job
from matrix_hpc.runtime.agent_actor import ActorBase
from matrix_hpc.runtime.message import DONE_STATUS, Task
from matrix_hpc.runtime.router import Directory, resolve
from matrix_hpc.store import RunStore

log = logging.getLogger(__name__)


class SinkActor(ActorBase):
    def __init__(self, job: Job, writer_id: str, directory: Directory, source: str, run_dir: str,
                 services: dict):
        super().__init__(job, directory)
        # Sandbox sessions belong to their task: closed once the task is committed.
        self.releasers = list(services.get("sandbox", {}).values())
        store = RunStore.open(Path(run_dir))
        # One writer per sink of one driver run: a sink orphaned by a killed driver may still be
        # committing while the resumed run's sinks start, and two processes must never share a writer.
        self.writer = store.writer(writer_id)
        self.seen = set(store.committed())  # exactly once, across restarts and resumes
        self.source = ray.get_actor(source)
        self.interval = job.spec.run.commit_interval_s
        self.flush_rows = max(1, min(4096, job.spec.run.max_in_flight // 4))
        self.buffer: list[tuple[str, int, int, bytes]] = []
        self.flushing: asyncio.Task | None = None
        self.paused = False
        self.done = self.failed = self.duplicates = 0
        self.ticker: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._maybe_flush(force=True)

    async def deliver(self, items: list) -> int:
        if self.ticker is None:  # started here, so that a restarted sink ticks too
            self.ticker = asyncio.get_running_loop().create_task(self._tick())
        for data in await resolve(items):
            t = Task.FromString(data)
            if t.task_id in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(t.task_id)
            self.buffer.append((t.task_id, t.row_index, t.status, data))
        self._maybe_flush()
        return len(self.buffer)

    def _maybe_flush(self, force: bool = False) -> None:
        if self.paused or self.flushing or not self.buffer or (not force and len(self.buffer) < self.flush_rows):
            return
        batch, self.buffer = self.buffer, []
        self.flushing = asyncio.get_running_loop().create_task(self._flush(batch))

    async def _flush(self, batch: list[tuple[str, int, int, bytes]]) -> None:
        try:
            await asyncio.to_thread(self._write, batch)
            ids = [tid for tid, *_ in batch]
            for endpoint in self.releasers:  # before the source hears of it: a finished task holds nothing
                try:
                    await endpoint.release(ids)
                except Exception as e:  # noqa: BLE001 - the TTL reaper closes them later anyway
                    log.warning("could not release sandbox sessions of %d task(s): %s", len(ids), e)
            await self.source.finished.remote(ids)
            done = sum(1 for _, _, status, _ in batch if status == DONE_STATUS)
            self.done += done
            self.failed += len(batch) - done
        finally:
            self.flushing = None
        self._maybe_flush()

    def _write(self, batch: list[tuple[str, int, int, bytes]]) -> None:
        for tid, row_index, status, data in batch:
            self.writer.append(tid, row_index, status, data)
        self.writer.flush()

    async def pause(self) -> None:
        self.paused = True
        if self.flushing:
            await asyncio.shield(self.flushing)

    async def resume(self) -> None:
        self.paused = False
        self._maybe_flush()

    async def collect(self) -> list[bytes]:
        return [data for *_, data in self.buffer]

    async def close(self) -> dict:
        """Commit everything received; return final counts."""
        self.paused = False
        while self.flushing or self.buffer:
            if self.flushing:
                await asyncio.shield(self.flushing)
            else:
                self._maybe_flush(force=True)
        return await self.stats()

    async def stats(self) -> dict:
        return {"incarnation": self.incarnation, "done": self.done, "failed": self.failed,
                "buffered": len(self.buffer), "duplicates": self.duplicates}
