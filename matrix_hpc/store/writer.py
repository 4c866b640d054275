"""Committing results: one writer per sink, ``writers/<writer_id>/``, nobody else writes inside it.

A segment is up to 1024 rows committed together: its chunks are written whole (temp file,
fsync, rename), then its one-chunk commit record (see segments.py for what makes one count).
"""

from __future__ import annotations

import socket
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from matrix_hpc.store._durable import TMP_SUFFIX, DurableLocalStore
from matrix_hpc.store.chunks import set_many
from matrix_hpc.store.layout import (
    ARRAY_CONFIG,
    ARRAYS,
    DONE,
    FAILED,
    HEAP_CHUNK,
    I_IDLEN,
    I_IDOFF,
    I_LEN,
    I_OFF,
    I_ROW,
    I_STATUS,
    I_VALID,
    IDS_CHUNK,
    INDEX_COLS,
    KEY_ENCODING,
    MAGIC,
    R_HEAP_END,
    R_HEAP_SIZE,
    R_HEAP_START,
    R_IDS_NBYTES,
    R_IDS_SIZE,
    R_INDEX_SIZE,
    R_MAGIC,
    R_NDONE,
    R_NFAILED,
    R_NROWS,
    R_OLDEST_NS,
    R_ROWS_CRC,
    R_SEQ,
    R_TIME_NS,
    RECORD_WIDTH,
    ROWS_PER_SEGMENT,
    SEGMENT_HEAP_BUDGET,
    WRITER_ID,
    StoreError,
    chunk_ids,
    compressors,
    file_size,
    now_iso,
)


class ResultWriter:
    """Commits finished tasks of one sink into ``writers/<writer_id>/``; no other process writes there.

    ``append`` buffers; ``flush`` writes the buffer as segments of whole chunks and returns once
    they and their commit records are on disk. Reopening the same id after a crash continues
    after the highest chunk on disk, so nothing written before (torn or not) is overwritten.
    """

    def __init__(self, store_path: Path, writer_id: str, *, fsync: bool = True,
                 before_commit: Callable[[], None] | None = None):
        if not WRITER_ID.match(writer_id or ""):
            raise StoreError(f"writer id {writer_id!r}: use letters, digits, '_', '-', '.' (max 128)")
        self.writer_id = writer_id
        self.folder = store_path / "writers" / writer_id
        self._zs = DurableLocalStore(store_path, fsync=fsync)
        root = zarr.open_group(self._zs, mode="r+")
        base = f"writers/{writer_id}"
        if not (self.folder / "zarr.json").exists():
            root.create_group(base, attributes={"created": now_iso(), "host": socket.gethostname()})
        arrays = {}
        for name, spec in ARRAYS.items():
            if (self.folder / name / "zarr.json").exists():
                arrays[name] = zarr.open_array(self._zs, path=f"{base}/{name}", mode="r+")
            else:
                arrays[name] = zarr.create_array(self._zs, name=f"{base}/{name}", fill_value=0,
                                                 compressors=compressors(), chunk_key_encoding=KEY_ENCODING,
                                                 config=ARRAY_CONFIG, overwrite=True, **spec)
        self._heap, self._ids, self._index, self._commits = (
            arrays["heap"], arrays["ids"], arrays["index"], arrays["commits"])
        self._zs.sync_dirs()
        # leftovers of a killed flush: temp files are garbage; chunks without a record are never reused
        for sub in ARRAYS:
            for p in (self.folder / sub).glob(f"*{TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
        last = max([-1] + chunk_ids(self.folder / "commits") + chunk_ids(self.folder / "index")
                   + chunk_ids(self.folder / "ids"))
        self._next_seq = last + 1
        self._heap_pos = (max([-1] + chunk_ids(self.folder / "heap")) + 1) * HEAP_CHUNK
        self._buf: list[tuple[bytes, int, int, bytes, int]] = []
        # called after the chunks, before the commit records (a sink's last check; tests' torn commits)
        self._before_commit = before_commit
        self.rows_committed = 0

    def __repr__(self) -> str:
        return f"ResultWriter({self.writer_id!r}, pending={self.pending})"

    @property
    def pending(self) -> int:
        return len(self._buf)

    def append(self, task_id: str, row_index: int, status: int, envelope: bytes) -> None:
        if status not in (DONE, FAILED):
            raise StoreError(f"status must be TASK_STATUS_DONE or TASK_STATUS_FAILED, got {status}")
        tid = task_id.encode()
        if not tid or len(tid) > IDS_CHUNK:
            raise StoreError(f"task id must be 1..{IDS_CHUNK} bytes, got {len(tid)}")
        if not isinstance(envelope, bytes):
            envelope = bytes(envelope)
        self._buf.append((tid, int(row_index), int(status), envelope, time.time_ns()))

    def _cut(self) -> list[list]:
        """Split the buffer into segments: <= 1024 rows, <= 64 KiB of ids, ~<= 8 MiB of envelopes."""
        segs, cur, ids_n, heap_n = [], [], 0, 0
        for row in self._buf:
            if cur and (len(cur) == ROWS_PER_SEGMENT or ids_n + len(row[0]) > IDS_CHUNK
                        or heap_n >= SEGMENT_HEAP_BUDGET):
                segs.append(cur)
                cur, ids_n, heap_n = [], 0, 0
            cur.append(row)
            ids_n += len(row[0])
            heap_n += len(row[3])
        if cur:
            segs.append(cur)
        return segs

    def flush(self) -> None:
        """Make every appended row durable; returns once the chunks and commit records are on disk."""
        if not self._buf:
            return
        first_seq = self._next_seq
        plans = [self._plan_segment(rows) for rows in self._cut()]
        # every chunk of every segment in one round trip: zarr writes them concurrently
        writes = []
        for p in plans:
            if p["heap"] is not None:
                hs = p["heap_start"]
                writes.append((self._heap, slice(hs, hs + p["heap"].size), p["heap"]))
            writes.append((self._index, slice(p["seq"] * ROWS_PER_SEGMENT, (p["seq"] + 1) * ROWS_PER_SEGMENT),
                           p["index"]))
            writes.append((self._ids, slice(p["seq"] * IDS_CHUNK, (p["seq"] + 1) * IDS_CHUNK), p["ids"]))
        set_many(writes)
        records = [self._record(p) for p in plans]
        self._zs.sync_dirs()  # every chunk name durable before any record names it
        if self._before_commit is not None:
            self._before_commit()
        self._commits[first_seq:first_seq + len(records)] = np.stack(records)
        self._zs.sync_dirs()
        self.rows_committed += len(self._buf)
        self._buf = []

    def _plan_segment(self, rows: list) -> dict:
        seq = self._next_seq
        self._next_seq += 1
        n = len(rows)
        lens = np.fromiter((len(r[3]) for r in rows), dtype=np.int64, count=n)
        heap_start = self._heap_pos
        heap_len = int(lens.sum())
        idx = np.zeros((ROWS_PER_SEGMENT, INDEX_COLS), dtype=np.int64)
        idx[:n, I_ROW] = [r[1] for r in rows]
        idx[:n, I_STATUS] = [r[2] for r in rows]
        idx[:n, I_OFF] = heap_start
        idx[1:n, I_OFF] += np.cumsum(lens)[:-1]
        idx[:n, I_LEN] = lens
        tids = [r[0] for r in rows]
        tlens = np.fromiter((len(t) for t in tids), dtype=np.int64, count=n)
        idx[:n, I_IDLEN] = tlens
        idx[1:n, I_IDOFF] = np.cumsum(tlens)[:-1]
        idx[:n, I_VALID] = 1
        ids_raw = b"".join(tids)
        ids = np.zeros(IDS_CHUNK, dtype=np.uint8)
        ids[:len(ids_raw)] = np.frombuffer(ids_raw, dtype=np.uint8)
        padded = -(-heap_len // HEAP_CHUNK) * HEAP_CHUNK
        heap = None
        if heap_len:
            heap = np.zeros(padded, dtype=np.uint8)
            heap[:heap_len] = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.uint8)
        self._heap_pos = heap_start + padded
        rows_crc = zlib.crc32(ids_raw, zlib.crc32(idx[:n].tobytes()))
        return {"seq": seq, "n": n, "rows_crc": rows_crc, "n_done": int(np.sum(idx[:n, I_STATUS] == DONE)),
                "index": idx,
                "ids": ids, "ids_nbytes": len(ids_raw), "heap": heap, "heap_start": heap_start,
                "heap_len": heap_len, "padded": padded, "oldest_ns": min(r[4] for r in rows)}

    def _record(self, p: dict) -> np.ndarray:
        seq, hs = p["seq"], p["heap_start"]
        rec = np.zeros(RECORD_WIDTH, dtype=np.int64)
        rec[R_MAGIC] = MAGIC
        rec[R_SEQ] = seq
        rec[R_NROWS] = p["n"]
        rec[R_NDONE] = p["n_done"]
        rec[R_NFAILED] = p["n"] - p["n_done"]
        rec[R_HEAP_START] = hs
        rec[R_HEAP_END] = hs + p["heap_len"]
        rec[R_IDS_NBYTES] = p["ids_nbytes"]
        rec[R_INDEX_SIZE] = file_size(self.folder / "index" / f"c.{seq}.0")
        rec[R_IDS_SIZE] = file_size(self.folder / "ids" / f"c.{seq}")
        rec[R_HEAP_SIZE] = sum(file_size(self.folder / "heap" / f"c.{k}")
                               for k in range(hs // HEAP_CHUNK, (hs + p["padded"]) // HEAP_CHUNK))
        rec[R_OLDEST_NS] = p["oldest_ns"]
        rec[R_ROWS_CRC] = p["rows_crc"]
        rec[R_TIME_NS] = time.time_ns()
        return rec
