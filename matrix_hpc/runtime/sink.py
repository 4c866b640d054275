"""A sink: receives finished tasks, commits them to the run store in chunks, then tells the
source (which frees their places in flight). Each sink owns its own writer in the store.

A commit that fails (a full disk, a quota, an I/O error) is retried a few times; the rows it
held stay in the sink (a checkpoint sees them) and are never counted as committed. If it keeps
failing the sink reports ``commit_error`` and the driver ends the run cleanly (resumable).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from matrix_hpc import fate
from matrix_hpc.job.load import Job
from matrix_hpc.retry import retrying
from matrix_hpc.runtime.agent_actor import ActorBase
from matrix_hpc.runtime.message import DONE_STATUS, Task
from matrix_hpc.runtime.router import Directory, resolve
from matrix_hpc.store import RunStore

log = logging.getLogger(__name__)

COMMIT_RETRIES = 3
COMMIT_BACKOFF_S = 0.5

Row = tuple[str, int, int, bytes]  # task id, row index, status, envelope


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_write_error(e: BaseException, path: Path, pending_bytes: int) -> str:
    """What went wrong writing under ``path``, with the free space there when the disk is full."""
    text = f"{type(e).__name__}: {e}"
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return text
    return (f"{text} (free on the filesystem of {path}: {_size(free)}; "
            f"at least {_size(pending_bytes)} more needed for the rows waiting)")


def _stop_if_orphaned() -> None:
    """Right before a commit: if the process that started this local Ray is gone (kill -9, OOM), this
    process ends here, without committing: the run is over, and a resume may already be running."""
    if fate.owner_gone():
        log.error("the run's driver is gone: this sink stops without committing")
        os._exit(1)


class SinkActor(ActorBase):
    def __init__(self, job: Job, writer_id: str, directory: Directory, source: str, services: dict):
        super().__init__(job, directory)
        # Sandbox sessions belong to their task: closed once the task is committed.
        self.releasers = list(services.get("sandbox", {}).values())
        self.run_dir = job.run_dir
        self.writer_id = writer_id
        store = RunStore.open(self.run_dir)
        # One writer per sink of one driver run: a sink orphaned by a killed driver may still be
        # committing while the resumed run's sinks start, and two processes must never share a writer.
        self.writer = store.writer(writer_id, before_commit=_stop_if_orphaned)
        self.seen = set(store.committed())  # exactly once, across restarts and resumes
        self.source = ray.get_actor(source)
        self.interval = job.spec.run.commit_interval_s
        self.flush_rows = max(1, min(4096, job.spec.run.max_in_flight // 4))
        self.buffer: list[Row] = []
        self.flushing: asyncio.Task | None = None
        self.paused = False
        self.done = self.failed = self.duplicates = self.commit_retries = 0
        self.commit_error: str | None = None  # set once commits keep failing: the run must stop
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
        if (self.paused or self.commit_error or self.flushing or not self.buffer
                or (not force and len(self.buffer) < self.flush_rows)):
            return
        batch, self.buffer = self.buffer, []
        self.flushing = asyncio.get_running_loop().create_task(self._flush(batch))

    async def _flush(self, batch: list[Row]) -> None:
        try:
            if not await self._commit(batch):
                self.buffer[:0] = batch  # still held here: a checkpoint saves them, nothing is lost
                return
            ids = [tid for tid, *_ in batch]
            done = sum(1 for _, _, status, _ in batch if status == DONE_STATUS)
            self.done += done
            self.failed += len(batch) - done
            for endpoint in self.releasers:  # before the source hears of it: a finished task holds nothing
                try:
                    await endpoint.release(ids)
                except Exception as e:  # noqa: BLE001 - the TTL reaper closes them later anyway
                    log.warning("could not release sandbox sessions of %d task(s): %s", len(ids), e)
            try:
                await self.source.finished.remote(ids)
            except RayActorError as e:  # a restarted source learns what is committed from the store
                log.warning("could not tell the source of %d commit(s): %s", len(ids), type(e).__name__)
        finally:
            self.flushing = None
        self._maybe_flush()

    async def _commit(self, batch: list[Row]) -> bool:
        """Write ``batch`` durably, retrying a failed write; False if it kept failing."""
        tries = 0
        try:
            # OSError, StoreError, or zarr's own: every failure is retried; the rows stay here meanwhile
            async for attempt in retrying(attempts=COMMIT_RETRIES + 1, base_s=COMMIT_BACKOFF_S, jitter=False,
                                          retry_on=lambda e: isinstance(e, Exception), logger=log,
                                          what=f"commit of {len(batch)} row(s) to {self.run_dir}"):
                with attempt:
                    tries += 1
                    await self._write_or_forget_writer(batch)
            return True
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops the run cleanly
            error = describe_write_error(e, self.run_dir, sum(len(r[3]) for r in batch))
            self.commit_error = f"commit of {len(batch)} row(s) to {self.run_dir} failed: {error}"
            log.error("%s; giving up after %d tries", self.commit_error, tries)
            return False
        finally:
            self.commit_retries += max(0, tries - 1)

    async def _write_or_forget_writer(self, batch: list[Row]) -> None:
        try:
            await asyncio.to_thread(self._write, batch)
        except BaseException:
            self.writer = None  # rebuilt from what is on disk before the next try
            raise

    def _write(self, batch: list[Row]) -> None:
        rows = batch
        if self.writer is None:
            # After a failed flush: reopen the writer (it continues after what is on disk) and
            # skip rows a partly written flush did commit, so no row is written twice.
            store = RunStore.open(self.run_dir)
            self.writer = store.writer(self.writer_id, before_commit=_stop_if_orphaned)
            committed = store.committed()
            rows = [r for r in batch if r[0] not in committed]
        for tid, row_index, status, data in rows:
            self.writer.append(tid, row_index, status, data)
        self.writer.flush()

    async def pause(self) -> None:
        await super().pause()
        self.paused = True
        if self.flushing:
            await asyncio.shield(self.flushing)

    async def resume(self) -> None:
        await super().resume()
        self.paused = False
        self._maybe_flush()

    async def collect(self) -> list[bytes]:
        return [data for *_, data in self.buffer]

    async def close(self) -> dict:
        """Commit everything received (unless commits are failing); return final counts."""
        self.paused = False
        while (self.flushing or self.buffer) and not self.commit_error:
            if self.flushing:
                await asyncio.shield(self.flushing)
            else:
                self._maybe_flush(force=True)
        return await self.stats()

    async def stats(self) -> dict:
        return {"incarnation": self.incarnation, "done": self.done, "failed": self.failed,
                "buffered": len(self.buffer), "duplicates": self.duplicates,
                "commit_retries": self.commit_retries, "commit_error": self.commit_error}
