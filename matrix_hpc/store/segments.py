"""Reading committed results: which segments of which writers count, and what they hold.

A segment counts only when its commit record decodes (crc32c), names itself, and every chunk
it covers has the size the record says, and when its index rows and task ids match the
record's checksum. Anything else (a torn chunk, a missing record, a killed flush) is ignored,
never repaired; it is looked at again on the next read.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from matrix_hpc.store.chunks import read_chunks
from matrix_hpc.store.layout import (
    DONE,
    HEAP_CHUNK,
    I_IDLEN,
    I_IDOFF,
    I_STATUS,
    I_VALID,
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
    ROWS_PER_SEGMENT,
    WRITER_ID,
    chunk_ids,
    file_size,
)


@dataclass
class Segment:
    writer: str
    seq: int
    time_ns: int
    n: int
    n_done: int
    n_failed: int
    heap_start: int
    heap_end: int
    ids_nbytes: int = 0
    oldest_ns: int = 0  # append time of the oldest row in the segment
    rows_crc: int = 0  # crc32 of the segment's index rows and task ids
    task_ids: list[str] = field(default_factory=list)
    index: np.ndarray | None = None  # (n, INDEX_COLS)


class WriterView:
    """Read-only handles on one writer's arrays (metadata never changes after creation)."""

    def __init__(self, root: zarr.Group, folder: Path, writer_id: str):
        self.id = writer_id
        self.folder = folder
        self.heap = root[f"writers/{writer_id}/heap"]
        self.ids = root[f"writers/{writer_id}/ids"]
        self.index = root[f"writers/{writer_id}/index"]
        self.commits = root[f"writers/{writer_id}/commits"]

    def heap_chunk_paths(self, start: int, end: int) -> list[Path]:
        return [self.folder / "heap" / f"c.{k}" for k in range(start // HEAP_CHUNK, -(-end // HEAP_CHUNK))]


class SegmentIndex:
    """Every valid segment of every writer in a store, read incrementally (a valid one never changes)."""

    def __init__(self, root: zarr.Group, store_path: Path):
        self._root = root
        self._writers = store_path / "writers"
        self.views: dict[str, WriterView] = {}
        self.segments: dict[tuple[str, int], Segment | None] = {}  # None: seen and invalid

    def writer_ids(self) -> list[str]:
        try:
            names = os.listdir(self._writers)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if WRITER_ID.match(n) and n != "zarr.json")

    def view(self, wid: str) -> WriterView | None:
        v = self.views.get(wid)
        if v is None:
            try:
                v = WriterView(self._root, self._writers / wid, wid)
            except Exception:  # noqa: BLE001 - a writer still creating its arrays, or a damaged folder
                return None
            self.views[wid] = v
        return v

    def refresh(self) -> None:
        """Read the segments committed since the last call.

        Segments found invalid are looked at again next time: on a shared filesystem a reader
        on another host may briefly see stale sizes, and such a segment must not be lost.
        """
        for wid in self.writer_ids():
            v = self.view(wid)
            if v is None:
                continue
            seqs = sorted(s for s in chunk_ids(v.folder / "commits") if self.segments.get((wid, s)) is None)
            if seqs:
                self._load(v, seqs)

    def ordered(self) -> tuple[list[Segment], dict[str, int], int]:
        """Valid segments oldest first, the first status of each task id, and the duplicate count."""
        self.refresh()
        segs = sorted((s for s in self.segments.values() if s is not None),
                      key=lambda s: (s.time_ns, s.writer, s.seq))
        first: dict[str, int] = {}
        dups = 0
        for s in segs:
            for tid, st in zip(s.task_ids, s.index[:, I_STATUS].tolist(), strict=True):
                if tid in first:
                    dups += 1
                else:
                    first[tid] = st
        return segs, first, dups

    def valid_keys(self) -> list[tuple[str, int]]:
        self.refresh()
        return [k for k, s in self.segments.items() if s is not None]

    def torn(self) -> int:
        return sum(1 for s in self.segments.values() if s is None)

    def _load(self, v: WriterView, seqs: list[int]) -> None:
        recs = read_chunks(v.commits, seqs, v.folder / "commits")
        good: list[Segment] = []
        for s in seqs:
            rec = recs[s]
            seg = None
            if rec is not None and _record_ok(v, s, rec[0]):
                rec = rec[0]
                seg = Segment(v.id, s, int(rec[R_TIME_NS]), int(rec[R_NROWS]), int(rec[R_NDONE]),
                              int(rec[R_NFAILED]), int(rec[R_HEAP_START]), int(rec[R_HEAP_END]),
                              int(rec[R_IDS_NBYTES]), int(rec[R_OLDEST_NS]), int(rec[R_ROWS_CRC]))
                good.append(seg)
            self.segments[(v.id, s)] = seg
        if not good:
            return
        gseqs = [g.seq for g in good]
        index = read_chunks(v.index, gseqs, v.folder / "index")
        ids = read_chunks(v.ids, gseqs, v.folder / "ids")
        for g in good:
            if not _fill(g, index[g.seq], ids[g.seq]):
                self.segments[(v.id, g.seq)] = None


def _fill(g: Segment, idx: np.ndarray | None, raw: np.ndarray | None) -> bool:
    """Give ``g`` its index rows and task ids if they are exactly the ones its record names."""
    if idx is None or raw is None:
        return False
    idx = idx[:g.n]
    if not (np.all(idx[:, I_VALID] == 1) and int(np.sum(idx[:, I_STATUS] == DONE)) == g.n_done):
        return False
    raw = raw[:g.ids_nbytes].tobytes()
    # the record names exactly these rows (not rows of another flush of the same size)
    if zlib.crc32(raw, zlib.crc32(np.ascontiguousarray(idx).tobytes())) != g.rows_crc:
        return False
    try:
        g.task_ids = [raw[o:o + n].decode() for o, n in zip(idx[:, I_IDOFF].tolist(),
                                                          idx[:, I_IDLEN].tolist(), strict=True)]
    except UnicodeDecodeError:
        return False
    g.index = np.ascontiguousarray(idx)
    return True


def _record_ok(v: WriterView, seq: int, rec: np.ndarray) -> bool:
    if int(rec[R_MAGIC]) != MAGIC or int(rec[R_SEQ]) != seq:
        return False
    n = int(rec[R_NROWS])
    if not 0 < n <= ROWS_PER_SEGMENT or int(rec[R_NDONE]) + int(rec[R_NFAILED]) != n:
        return False
    if file_size(v.folder / "index" / f"c.{seq}.0") != int(rec[R_INDEX_SIZE]):
        return False
    if file_size(v.folder / "ids" / f"c.{seq}") != int(rec[R_IDS_SIZE]):
        return False
    start, end = int(rec[R_HEAP_START]), int(rec[R_HEAP_END])
    sizes = [file_size(p) for p in v.heap_chunk_paths(start, end)]
    return all(s >= 0 for s in sizes) and sum(sizes) == int(rec[R_HEAP_SIZE])
