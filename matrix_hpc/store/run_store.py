"""The run store: a run directory holding a zarr v3 group of committed results and snapshots.

Layout (see docs/store.md and layout.py)::

    RUN_DIR/
      job.yaml  payload.desc  fingerprint.json  logs/events.jsonl
      store.zarr/                       zarr v3 group (attrs: format, payload_type, total_tasks)
        writers/<writer_id>/            one group per sink; nobody else writes inside it (writer.py)
          heap     uint8 [2^50]  chunks 1 MiB   envelope bytes, each segment starts on a chunk
          ids      uint8 [2^50]  chunks 64 KiB  task ids of segment s live in chunk s
          index    int64 [2^40,8] chunks (1024,8) row r of segment s at s*1024+r
          commits  int64 [2^40,16] chunks (1,16) commit record of segment s = chunk s
        snapshots/<seq>/                heap + offsets; attrs.complete written last (snapshots.py)

``RunStore`` is the front: creating and opening a run directory, and reading it (segments.py
decides which commits count). Writing results goes through ``RunStore.writer(id)``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import zarr
from zarr.storage import LocalStore

from matrix_hpc.store._durable import TMP_SUFFIX, DurableLocalStore, fsync_dir, write_atomic
from matrix_hpc.store.events import EventLog
from matrix_hpc.store.layout import (
    DESC_FILE,
    DONE,
    EVENTS_FILE,
    FAILED,
    FINGERPRINT_FILE,
    FORMAT,
    FORMAT_VERSION,
    I_LEN,
    I_OFF,
    I_STATUS,
    JOB_FILE,
    LOGS_DIR,
    SNAPSHOTS_KEPT,
    STORE_NAME,
    StoreError,
    now_iso,
)
from matrix_hpc.store.segments import SegmentIndex
from matrix_hpc.store.snapshots import Snapshots
from matrix_hpc.store.tally import Tally, tally
from matrix_hpc.store.throughput import processing_seconds, rate
from matrix_hpc.store.writer import ResultWriter

__all__ = ["DONE", "FAILED", "ResultWriter", "RunStore", "StoreError"]


class RunStore:
    """A run directory: job spec, payload descriptors, fingerprint, logs and the zarr store."""

    def __init__(self, run_dir: Path, attrs: dict):
        self.run_dir = Path(run_dir)
        self.store_path = self.run_dir / STORE_NAME
        self.payload_type: str = attrs["payload_type"]
        self.total_tasks: int = int(attrs["total_tasks"])
        self.created: str = attrs.get("created", "")
        self.fingerprint: dict[str, str] = json.loads((self.run_dir / FINGERPRINT_FILE).read_text())
        self.descriptor_set: bytes = (self.run_dir / DESC_FILE).read_bytes()
        self._root = zarr.open_group(LocalStore(self.store_path, read_only=True), mode="r")
        self._segments = SegmentIndex(self._root, self.store_path)
        self._wstore: DurableLocalStore | None = None
        self.snapshots = Snapshots(self.store_path, self._write_store)
        self._events = EventLog(self.run_dir / LOGS_DIR / EVENTS_FILE)

    # ---- creation / opening -------------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: Path, *, job_yaml: str, descriptor_set: bytes, payload_type: str,
               fingerprint: dict[str, str], total_tasks: int) -> RunStore:
        run_dir = Path(run_dir)
        store_path = run_dir / STORE_NAME
        if store_path.exists():
            raise StoreError(f"{run_dir} already holds a run store ({store_path}); "
                             "resume it, or choose another run directory")
        if not isinstance(fingerprint, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in fingerprint.items()):
            raise StoreError("fingerprint must be a dict of str -> str")
        if total_tasks < 0:
            raise StoreError(f"total_tasks must be >= 0, got {total_tasks}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / LOGS_DIR).mkdir(exist_ok=True)
        write_atomic(run_dir / JOB_FILE, job_yaml.encode())
        write_atomic(run_dir / DESC_FILE, bytes(descriptor_set))
        write_atomic(run_dir / FINGERPRINT_FILE,
                     (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode())
        # The root group's zarr.json is written last: it marks a finished creation.
        tmp = run_dir / f".{STORE_NAME}.{os.getpid()}{TMP_SUFFIX}"
        if tmp.exists():
            shutil.rmtree(tmp)
        zs = DurableLocalStore(tmp)
        root = zarr.create_group(zs, zarr_format=3, attributes={
            "format": FORMAT, "format_version": FORMAT_VERSION, "payload_type": payload_type,
            "total_tasks": int(total_tasks), "created": now_iso()})
        root.create_group("writers")
        root.create_group("snapshots")
        zs.sync_dirs()
        try:
            os.rename(tmp, store_path)  # atomic; fails if another process created it meanwhile
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{run_dir} already holds a run store ({store_path})") from e
        fsync_dir(run_dir)
        return cls.open(run_dir)

    @classmethod
    def open(cls, run_dir: Path) -> RunStore:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise StoreError(f"{run_dir}: no such run directory")
        meta = run_dir / STORE_NAME / "zarr.json"
        if not meta.is_file():
            raise StoreError(f"{run_dir} is not a matrix-hpc run directory (no {STORE_NAME}/zarr.json)")
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError) as e:
            raise StoreError(f"{meta}: unreadable store metadata: {e}") from e
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{run_dir / STORE_NAME} is a zarr group but not a matrix-hpc run store")
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise StoreError(f"{run_dir}: store format version {attrs['format_version']} is newer than "
                             f"this matrix-hpc understands ({FORMAT_VERSION}); upgrade matrix-hpc")
        for name in (FINGERPRINT_FILE, DESC_FILE):
            if not (run_dir / name).is_file():
                raise StoreError(f"{run_dir}: {name} is missing; the run directory is damaged")
        return cls(run_dir, attrs)

    def __repr__(self) -> str:
        return f"RunStore({str(self.run_dir)!r})"

    def set_total_tasks(self, total_tasks: int) -> None:
        """Record a new number of tasks for the run (e.g. the dataset grew), atomically."""
        if total_tasks < 0:
            raise StoreError(f"total_tasks must be >= 0, got {total_tasks}")
        root = zarr.open_group(self._write_store(), mode="r+")
        root.attrs["total_tasks"] = int(total_tasks)
        self._write_store().sync_dirs()
        self.total_tasks = int(total_tasks)

    @property
    def job_yaml(self) -> str:
        return (self.run_dir / JOB_FILE).read_text()

    def fingerprint_changes(self, new: dict[str, str]) -> list[str]:
        """Keys whose values differ between the stored fingerprint and ``new`` (added or removed too)."""
        old = self.fingerprint
        return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

    # ---- results ------------------------------------------------------------------------------
    def writer(self, writer_id: str, *, fsync: bool = True,
               before_commit: Callable[[], None] | None = None) -> ResultWriter:
        """``before_commit`` runs in each flush after the rows' chunks are written and before the
        records that commit them: raising (or exiting) there commits nothing."""
        return ResultWriter(self.store_path, writer_id, fsync=fsync, before_commit=before_commit)

    def committed(self) -> dict[str, int]:
        """task_id -> TASK_STATUS_DONE / TASK_STATUS_FAILED for every committed row, all writers."""
        return self._segments.ordered()[1]

    def mark(self) -> frozenset[tuple[str, int]]:
        """The commits seen so far: ``iter_results(since=mark)`` yields only rows committed after."""
        return frozenset(self._segments.valid_keys())

    def iter_results(self, *, status: int | None = None,
                     since: frozenset[tuple[str, int]] = frozenset()) -> Iterator[bytes]:
        """Committed Task envelopes (bytes), oldest commit first; a duplicated task id only once.
        With ``since`` (a ``mark()``), only the rows first committed after that mark."""
        return self._envelopes(self._segments.ordered()[0], status, since)

    def _envelopes(self, segs: list, status: int | None, since: frozenset[tuple[str, int]]) -> Iterator[bytes]:
        # the rows of marked commits count as seen, whatever the order of the commits after the mark
        seen = {tid for s in segs if (s.writer, s.seq) in since for tid in s.task_ids}
        for s in segs:
            if (s.writer, s.seq) in since:
                continue
            v = self._segments.views[s.writer]
            try:
                heap = v.heap[s.heap_start:s.heap_end].tobytes() if s.heap_end > s.heap_start else b""
            except Exception as e:  # noqa: BLE001 - zarr's decode errors have no common type: worded as damage
                raise StoreError(
                    f"{v.folder / 'heap'}: envelope chunks of commit {s.seq} are damaged ({e}); "
                    f"remove {v.folder / 'commits' / f'c.{s.seq}.0'} to have its {s.n} rows redone") from e
            offs = (s.index[:, I_OFF] - s.heap_start).tolist()
            lens = s.index[:, I_LEN].tolist()
            for tid, st, o, n in zip(s.task_ids, s.index[:, I_STATUS].tolist(), offs, lens, strict=True):
                if tid in seen:
                    continue
                seen.add(tid)
                if status is None or st == status:
                    yield heap[o:o + n]

    # ---- snapshots ----------------------------------------------------------------------------
    def _write_store(self) -> DurableLocalStore:
        if self._wstore is None:
            self._wstore = DurableLocalStore(self.store_path)
        return self._wstore

    def write_snapshot(self, tasks: list[bytes], *, meta: dict, keep: int = SNAPSHOTS_KEPT) -> None:
        """Store the serialized in-flight tasks as a new snapshot, atomically (see Snapshots.write)."""
        self.snapshots.write(tasks, meta=meta, keep=keep)

    def latest_snapshot(self) -> tuple[list[bytes], dict] | None:
        """(serialized tasks, meta) of the newest complete snapshot, or None (see Snapshots.latest)."""
        return self.snapshots.latest()

    # ---- status and logs ----------------------------------------------------------------------
    def tally(self, since: frozenset[tuple[str, int]] = frozenset()) -> Tally:
        """Steps by role and retries in the committed tasks (those committed after ``since``)."""
        return tally(self.iter_results(since=since))

    def status(self) -> dict:
        """Totals and rates, read-only: safe while writers are writing."""
        segs, first, dups = self._segments.ordered()
        try:
            counted, damaged = tally(self._envelopes(segs, None, frozenset())), None
        except StoreError as e:  # the totals still stand; steps and retries need every envelope
            counted, damaged = Tally(), str(e)
        done = sum(1 for v in first.values() if v == DONE)
        failed = len(first) - done
        snap = self.snapshots.latest_attrs()
        in_flight = snap[1]["n_tasks"] if snap else None
        times = [s.time_ns for s in segs]
        out = {
            "run_dir": str(self.run_dir),
            "payload_type": self.payload_type,
            "total": self.total_tasks,
            "done": done,
            "failed": failed,
            "committed": done + failed,
            "duplicates": dups,
            "steps_by_role": counted.steps,
            "retries": counted.retries,
            "unreadable_envelopes": counted.unreadable,
            "damaged": damaged,
            "pending": max(self.total_tasks - done - failed, 0),
            "in_flight_at_last_checkpoint": in_flight,
            "last_checkpoint_time": snap[1]["time"] if snap else None,
            "writers": len({s.writer for s in segs}),
            "segments": len(segs),
            "torn_segments": self._segments.torn(),
            "first_commit_time": now_iso(min(times) / 1e9) if times else None,
            "last_commit_time": now_iso(max(times) / 1e9) if times else None,
            "processing_s": None,
            "throughput_rows_per_s": None,  # rows committed per second of processing (store/throughput.py)
            "recent_rows_per_s": None,
        }
        if segs:
            end = max(times)
            processing = processing_seconds(self.events(), segs)
            if processing is None:  # no session recorded (a store written without a driver)
                processing = (end - min(s.oldest_ns for s in segs)) / 1e9
            out["processing_s"] = round(processing, 3)
            out["throughput_rows_per_s"] = rate(done + failed, processing)
            window = min(60e9, end - min(s.oldest_ns for s in segs))
            if window > 0:
                recent = sum(s.n for s in segs if s.time_ns >= end - window)
                out["recent_rows_per_s"] = rate(recent, window / 1e9)
        return out

    def log_event(self, kind: str, **fields) -> None:
        """Append one JSON line to logs/events.jsonl."""
        self._events.append(kind, **fields)

    def events(self) -> list[dict]:
        return self._events.read()
