"""The run store: a run directory holding a zarr v3 group of committed results and snapshots.

Layout (see docs/store.md)::

    RUN_DIR/
      job.yaml  payload.desc  fingerprint.json  logs/events.jsonl
      store.zarr/                       zarr v3 group (attrs: format, payload_type, total_tasks)
        writers/<writer_id>/            one group per sink; nobody else writes inside it
          heap     uint8 [2^50]  chunks 1 MiB   envelope bytes, each segment starts on a chunk
          ids      uint8 [2^50]  chunks 64 KiB  task ids of segment s live in chunk s
          index    int64 [2^40,8] chunks (1024,8) row r of segment s at s*1024+r
          commits  int64 [2^40,16] chunks (1,16) commit record of segment s = chunk s
        snapshots/<seq>/                heap + offsets; attrs.complete written last

A *segment* is up to 1024 rows committed together: its chunks are written whole (temp file,
fsync, rename), then its one-chunk commit record. A segment counts only when its record
decodes (crc32c), names itself, and every chunk it covers has the size the record says;
anything else (a torn chunk, a missing record, a killed flush) is ignored, never repaired.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from matrix_hpc.store._durable import TMP_SUFFIX, DurableLocalStore, fsync_dir, write_atomic
from matrix_hpc.v1 import task_pb2

DONE = task_pb2.TASK_STATUS_DONE
FAILED = task_pb2.TASK_STATUS_FAILED

FORMAT = "matrix-hpc-run-store"
FORMAT_VERSION = 1

STORE_NAME = "store.zarr"
JOB_FILE = "job.yaml"
DESC_FILE = "payload.desc"
FINGERPRINT_FILE = "fingerprint.json"
LOGS_DIR = "logs"
EVENTS_FILE = "events.jsonl"

ROWS_PER_SEGMENT = 1024  # rows per index chunk = most rows per commit record
INDEX_COLS = 8
IDS_CHUNK = 64 * 1024  # task-id bytes per segment at most
HEAP_CHUNK = 1 << 20  # envelope bytes per heap chunk
SEGMENT_HEAP_BUDGET = 8 << 20  # a segment closes once its envelopes pass this size
SNAPSHOT_CHUNK = 8 << 20
SNAPSHOTS_KEPT = 3

HEAP_SHAPE = 1 << 50
INDEX_SHAPE = 1 << 40
RECORD_WIDTH = 16
MAGIC = 0x4D54525800000000 | FORMAT_VERSION  # "MTRX" + version

# index columns
I_ROW, I_STATUS, I_OFF, I_LEN, I_IDOFF, I_IDLEN, I_VALID = range(7)
# commit record fields
(R_MAGIC, R_SEQ, R_NROWS, R_NDONE, R_NFAILED, R_HEAP_START, R_HEAP_END, R_IDS_NBYTES, R_TIME_NS,
 R_INDEX_SIZE, R_IDS_SIZE, R_HEAP_SIZE, R_OLDEST_NS, R_ROWS_CRC) = range(14)

_WRITER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CHUNK_NAME = re.compile(r"^c\.(\d+)(?:\.0)?$")


class StoreError(Exception):
    """The run directory is missing, not a run store, or cannot be written as asked."""


def _compressors():
    return [ZstdCodec(level=1), Crc32cCodec()]


_KEY_ENCODING = {"name": "default", "separator": "."}  # all chunk files of an array in one folder
_ARRAY_CONFIG = {"write_empty_chunks": True}  # a chunk of zeros is still a chunk we committed

_ARRAYS = {
    "heap": dict(shape=(HEAP_SHAPE,), chunks=(HEAP_CHUNK,), dtype="uint8"),
    "ids": dict(shape=(HEAP_SHAPE,), chunks=(IDS_CHUNK,), dtype="uint8"),
    "index": dict(shape=(INDEX_SHAPE, INDEX_COLS), chunks=(ROWS_PER_SEGMENT, INDEX_COLS), dtype="int64"),
    "commits": dict(shape=(INDEX_SHAPE, RECORD_WIDTH), chunks=(1, RECORD_WIDTH), dtype="int64"),
}


def _now_iso(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _chunk_ids(folder: Path) -> list[int]:
    """Chunk numbers of the chunk files in an array folder (temp files ignored)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = _CHUNK_NAME.match(n)
        if m:
            out.append(int(m.group(1)))
    return out


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


@dataclass
class _Segment:
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


class _WriterView:
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


_FAST_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 1, "checksum": False}}, {"name": "crc32c"}]
_FAST_CODECS_1B = [{"name": "bytes"}] + _FAST_CODECS[1:]  # one-byte types have no endianness
_ZSTD = Zstd()


def _fast_readable(arr) -> bool:
    """Whether the chunks of ``arr`` are exactly what _decode_chunk_file decodes."""
    meta = arr.metadata
    try:
        return ([c.to_dict() for c in meta.codecs] in (_FAST_CODECS, _FAST_CODECS_1B)
                and meta.chunk_key_encoding.to_dict() == {"name": "default",
                                                          "configuration": {"separator": "."}}
                and sys.byteorder == "little")
    except Exception:
        return False


def _decode_chunk_file(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Decode one chunk file written with _FAST_CODECS (bytes, zstd, crc32c) without zarr's machinery.

    The same bytes zarr would decode, at a fraction of its per-chunk cost: reading a store is
    dominated by many small chunks (commit records, index and ids chunks).
    """
    data = path.read_bytes()
    if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{path}: checksum mismatch (torn or damaged chunk)")
    raw = _ZSTD.decode(data[:-4])
    out = np.frombuffer(raw, dtype=dtype)
    if out.size != math.prod(shape):
        raise ValueError(f"{path}: decodes to {out.size} items, expected {math.prod(shape)}")
    return out.reshape(shape)


def _read_chunks(arr, seqs: list[int], folder: Path | None = None,
                 run: int = 256) -> dict[int, np.ndarray | None]:
    """Whole chunks ``seqs`` (along axis 0) of ``arr``; None for a chunk that does not decode.

    With ``folder`` (the array's folder) and our own codecs, chunk files are decoded directly.
    Otherwise consecutive chunks are read with one zarr slice (read concurrently); after a
    decode error (a torn chunk) the run is read again chunk by chunk to isolate it. Slices
    only: zarr's integer-array indexing costs memory in the number of chunks, and ours are huge.
    """
    c = arr.chunks[0]
    out: dict[int, np.ndarray | None] = {}
    if folder is not None and _fast_readable(arr):
        suffix = ".0" * (arr.ndim - 1)
        for s in seqs:
            try:
                out[s] = _decode_chunk_file(folder / f"c.{s}{suffix}", arr.chunks, arr.dtype)
            except Exception:
                out[s] = None
        return out
    runs: list[list[int]] = []
    for s in sorted(seqs):
        if runs and s == runs[-1][-1] + 1 and len(runs[-1]) < run:
            runs[-1].append(s)
        else:
            runs.append([s])
    for r in runs:
        try:
            data = arr[r[0] * c:(r[-1] + 1) * c]
            for i, s in enumerate(r):
                out[s] = data[i * c:(i + 1) * c]
        except Exception:
            for s in r:
                try:
                    out[s] = arr[s * c:(s + 1) * c]
                except Exception:
                    out[s] = None
    return out


def _set_many(writes: list) -> None:
    """``arr[sel] = value`` for each (arr, sel, value), concurrently, in one trip to zarr's loop."""

    async def go():
        await asyncio.gather(*(arr.async_array.setitem(sel, val) for arr, sel, val in writes))

    sync(go())


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
        self._views: dict[str, _WriterView] = {}
        self._segments: dict[tuple[str, int], _Segment | None] = {}  # None: seen and invalid
        self._wstore: DurableLocalStore | None = None

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
            "total_tasks": int(total_tasks), "created": _now_iso()})
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
    def writer(self, writer_id: str, *, fsync: bool = True) -> ResultWriter:
        return ResultWriter(self, writer_id, fsync=fsync)

    def _writer_ids(self) -> list[str]:
        try:
            names = os.listdir(self.store_path / "writers")
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _WRITER_ID.match(n) and n != "zarr.json")

    def _view(self, wid: str) -> _WriterView | None:
        v = self._views.get(wid)
        if v is None:
            try:
                v = _WriterView(self._root, self.store_path / "writers" / wid, wid)
            except Exception:  # a writer still creating its arrays, or a damaged folder
                return None
            self._views[wid] = v
        return v

    def _refresh(self) -> None:
        """Read the segments committed since the last call (a valid segment never changes).

        Segments found invalid are looked at again next time: on a shared filesystem a reader
        on another host may briefly see stale sizes, and such a segment must not be lost.
        """
        for wid in self._writer_ids():
            v = self._view(wid)
            if v is None:
                continue
            seqs = sorted(s for s in _chunk_ids(v.folder / "commits") if self._segments.get((wid, s)) is None)
            if seqs:
                self._load_segments(v, seqs)

    def _load_segments(self, v: _WriterView, seqs: list[int]) -> None:
        recs = _read_chunks(v.commits, seqs, v.folder / "commits")
        good: list[_Segment] = []
        for s in seqs:
            rec = recs[s]
            seg = None
            if rec is not None and self._record_ok(v, s, rec[0]):
                rec = rec[0]
                seg = _Segment(v.id, s, int(rec[R_TIME_NS]), int(rec[R_NROWS]), int(rec[R_NDONE]),
                               int(rec[R_NFAILED]), int(rec[R_HEAP_START]), int(rec[R_HEAP_END]),
                               int(rec[R_IDS_NBYTES]), int(rec[R_OLDEST_NS]), int(rec[R_ROWS_CRC]))
                good.append(seg)
            self._segments[(v.id, s)] = seg
        if not good:
            return
        gseqs = [g.seq for g in good]
        index = _read_chunks(v.index, gseqs, v.folder / "index")
        ids = _read_chunks(v.ids, gseqs, v.folder / "ids")
        for g in good:
            idx, raw = index[g.seq], ids[g.seq]
            ok = idx is not None and raw is not None
            if ok:
                idx = idx[:g.n]
                ok = (bool(np.all(idx[:, I_VALID] == 1))
                      and int(np.sum(idx[:, I_STATUS] == DONE)) == g.n_done)
            if ok:
                raw = raw[:g.ids_nbytes].tobytes()
                # the record names exactly these rows (not rows of another flush of the same size)
                ok = zlib.crc32(raw, zlib.crc32(np.ascontiguousarray(idx).tobytes())) == g.rows_crc
            if ok:
                try:
                    g.task_ids = [raw[o:o + n].decode() for o, n in zip(idx[:, I_IDOFF].tolist(),
                                                                      idx[:, I_IDLEN].tolist(), strict=True)]
                except UnicodeDecodeError:
                    ok = False
            if ok:
                g.index = np.ascontiguousarray(idx)
            else:
                self._segments[(v.id, g.seq)] = None

    @staticmethod
    def _record_ok(v: _WriterView, seq: int, rec: np.ndarray) -> bool:
        if int(rec[R_MAGIC]) != MAGIC or int(rec[R_SEQ]) != seq:
            return False
        n = int(rec[R_NROWS])
        if not 0 < n <= ROWS_PER_SEGMENT or int(rec[R_NDONE]) + int(rec[R_NFAILED]) != n:
            return False
        if _size(v.folder / "index" / f"c.{seq}.0") != int(rec[R_INDEX_SIZE]):
            return False
        if _size(v.folder / "ids" / f"c.{seq}") != int(rec[R_IDS_SIZE]):
            return False
        start, end = int(rec[R_HEAP_START]), int(rec[R_HEAP_END])
        sizes = [_size(p) for p in v.heap_chunk_paths(start, end)]
        return all(s >= 0 for s in sizes) and sum(sizes) == int(rec[R_HEAP_SIZE])

    def _ordered(self) -> tuple[list[_Segment], dict[str, int], int]:
        """Valid segments oldest first, the first status of each task id, and the duplicate count."""
        self._refresh()
        segs = sorted((s for s in self._segments.values() if s is not None),
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

    def committed(self) -> dict[str, int]:
        """task_id -> TASK_STATUS_DONE / TASK_STATUS_FAILED for every committed row, all writers."""
        return self._ordered()[1]

    def iter_results(self, *, status: int | None = None) -> Iterator[bytes]:
        """Committed Task envelopes (bytes), oldest commit first; a duplicated task id only once."""
        segs, _, _ = self._ordered()
        seen: set[str] = set()
        for s in segs:
            v = self._views[s.writer]
            try:
                heap = v.heap[s.heap_start:s.heap_end].tobytes() if s.heap_end > s.heap_start else b""
            except Exception as e:
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

    def _snapshot_seqs(self) -> list[int]:
        try:
            names = os.listdir(self.store_path / "snapshots")
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def write_snapshot(self, tasks: list[bytes], *, meta: dict, keep: int = SNAPSHOTS_KEPT) -> None:
        """Store the serialized in-flight tasks as a new snapshot, atomically.

        The snapshot's arrays are written first, then its group attributes with
        ``complete: true`` (one atomic rename): a crash before that leaves the previous
        snapshot as the latest. The newest ``keep`` complete snapshots are kept.
        """
        t0 = time.time()
        seqs = self._snapshot_seqs()
        seq = (seqs[-1] + 1) if seqs else 1
        name = f"snapshots/{seq:010d}"
        zs = self._write_store()
        lens = np.fromiter((len(t) for t in tasks), dtype=np.int64, count=len(tasks))
        offsets = np.zeros(len(tasks) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        heap = np.frombuffer(b"".join(tasks), dtype=np.uint8)
        root = zarr.open_group(zs, mode="r+")
        grp = root.create_group(name, attributes={"complete": False})
        h = grp.create_array("heap", shape=heap.shape, chunks=(SNAPSHOT_CHUNK,), dtype="uint8",
                             fill_value=0, compressors=_compressors(), chunk_key_encoding=_KEY_ENCODING,
                             config=_ARRAY_CONFIG)
        if heap.size:
            h[:] = heap
        o = grp.create_array("offsets", shape=offsets.shape, chunks=(1 << 20,), dtype="int64",
                             fill_value=0, compressors=_compressors(), chunk_key_encoding=_KEY_ENCODING,
                             config=_ARRAY_CONFIG)
        o[:] = offsets
        folder = self.store_path / name
        sizes = {f"{a}/{c}": _size(folder / a / c) for a in ("heap", "offsets")
                 for c in os.listdir(folder / a) if _CHUNK_NAME.match(c)}
        zs.sync_dirs()
        t1 = time.time()
        if getattr(self, "_before_snapshot_commit", None):
            self._before_snapshot_commit()
        grp.attrs.update({"complete": True, "n_tasks": len(tasks), "nbytes": int(heap.size),
                          "time": _now_iso(t1), "unix_time": t1, "write_seconds": round(t1 - t0, 4),
                          "sizes": sizes, "meta": meta})
        zs.sync_dirs()
        self._drop_old_snapshots(seq, keep)

    def _snapshot_attrs(self, seq: int) -> dict | None:
        folder = self.store_path / "snapshots" / f"{seq:010d}"
        try:
            attrs = json.loads((folder / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            return None
        if attrs.get("complete") is not True:
            return None
        for key, size in attrs.get("sizes", {}).items():
            if _size(folder / key) != size:
                return None
        return attrs

    def _drop_old_snapshots(self, latest: int, keep: int) -> None:
        """Keep ``latest`` and the ``keep - 1`` newest complete ones before it; remove the rest."""
        kept = 1
        for s in reversed(self._snapshot_seqs()):
            if s >= latest:
                continue
            if kept < keep and self._snapshot_attrs(s) is not None:
                kept += 1
                continue
            shutil.rmtree(self.store_path / "snapshots" / f"{s:010d}", ignore_errors=True)

    def _latest_snapshot_attrs(self) -> tuple[int, dict] | None:
        for s in reversed(self._snapshot_seqs()):
            a = self._snapshot_attrs(s)
            if a is not None:
                return s, a
        return None

    def latest_snapshot(self) -> tuple[list[bytes], dict] | None:
        """(serialized tasks, meta) of the newest complete snapshot, or None.

        ``meta`` is what was passed to write_snapshot plus ``time`` (ISO, UTC), ``unix_time``,
        ``n_tasks`` and ``seq``.
        """
        for s in reversed(self._snapshot_seqs()):
            attrs = self._snapshot_attrs(s)
            if attrs is None:
                continue
            try:
                grp = zarr.open_group(LocalStore(self.store_path / "snapshots" / f"{s:010d}",
                                                 read_only=True), mode="r")
                offsets = grp["offsets"][:]
                heap = grp["heap"][:].tobytes() if grp["heap"].shape[0] else b""
            except Exception:  # removed under us by a newer snapshot, or damaged: try the previous
                continue
            if len(offsets) != attrs["n_tasks"] + 1 or int(offsets[-1]) != len(heap):
                continue
            o = offsets.tolist()
            tasks = [heap[o[i]:o[i + 1]] for i in range(len(o) - 1)]
            meta = dict(attrs.get("meta", {}))
            meta.update(time=attrs["time"], unix_time=attrs["unix_time"], n_tasks=attrs["n_tasks"], seq=s)
            return tasks, meta
        return None

    # ---- status and logs ----------------------------------------------------------------------
    def status(self) -> dict:
        """Totals and rates, read-only: safe while writers are writing."""
        segs, first, dups = self._ordered()
        done = sum(1 for v in first.values() if v == DONE)
        failed = len(first) - done
        snap = self._latest_snapshot_attrs()
        in_flight = snap[1]["n_tasks"] if snap else None
        times = [s.time_ns for s in segs]
        rows = sum(s.n for s in segs)
        out = {
            "run_dir": str(self.run_dir),
            "payload_type": self.payload_type,
            "total": self.total_tasks,
            "done": done,
            "failed": failed,
            "committed": done + failed,
            "duplicates": dups,
            "pending": max(self.total_tasks - done - failed, 0),
            "in_flight_at_last_checkpoint": in_flight,
            "last_checkpoint_time": snap[1]["time"] if snap else None,
            "writers": len({s.writer for s in segs}),
            "segments": len(segs),
            "torn_segments": sum(1 for s in self._segments.values() if s is None),
            "first_commit_time": _now_iso(min(times) / 1e9) if times else None,
            "last_commit_time": _now_iso(max(times) / 1e9) if times else None,
            "throughput_rows_per_s": None,
            "recent_rows_per_s": None,
        }
        if segs:
            # committed rows over the time from the first append to the last commit
            start = min(s.oldest_ns for s in segs)
            end = max(times)
            if end > start:
                out["throughput_rows_per_s"] = round(rows / ((end - start) / 1e9), 2)
                window = min(60e9, end - start)
                recent = sum(s.n for s in segs if s.time_ns >= end - window)
                out["recent_rows_per_s"] = round(recent / (window / 1e9), 2)
        return out

    def log_event(self, kind: str, **fields) -> None:
        """Append one JSON line to logs/events.jsonl (a single write: lines never interleave)."""
        rec = {"time": _now_iso(), "kind": kind, "host": socket.gethostname(), "pid": os.getpid(), **fields}
        line = (json.dumps(rec, default=str) + "\n").encode()
        path = self.run_dir / LOGS_DIR / EVENTS_FILE
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        path = self.run_dir / LOGS_DIR / EVENTS_FILE
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut off by a crash
                continue
        return out


class ResultWriter:
    """Commits finished tasks of one sink into ``writers/<writer_id>/``; no other process writes there.

    ``append`` buffers; ``flush`` writes the buffer as segments of whole chunks and returns once
    they and their commit records are on disk. Reopening the same id after a crash continues
    after the highest chunk on disk, so nothing written before (torn or not) is overwritten.
    """

    def __init__(self, run_store: RunStore, writer_id: str, *, fsync: bool = True):
        if not _WRITER_ID.match(writer_id or ""):
            raise StoreError(f"writer id {writer_id!r}: use letters, digits, '_', '-', '.' (max 128)")
        self.run_store = run_store
        self.writer_id = writer_id
        self.folder = run_store.store_path / "writers" / writer_id
        self._zs = DurableLocalStore(run_store.store_path, fsync=fsync)
        root = zarr.open_group(self._zs, mode="r+")
        base = f"writers/{writer_id}"
        if not (self.folder / "zarr.json").exists():
            root.create_group(base, attributes={"created": _now_iso(), "host": socket.gethostname()})
        arrays = {}
        for name, spec in _ARRAYS.items():
            if (self.folder / name / "zarr.json").exists():
                arrays[name] = zarr.open_array(self._zs, path=f"{base}/{name}", mode="r+")
            else:
                arrays[name] = zarr.create_array(self._zs, name=f"{base}/{name}", fill_value=0,
                                                 compressors=_compressors(), chunk_key_encoding=_KEY_ENCODING,
                                                 config=_ARRAY_CONFIG, overwrite=True, **spec)
        self._heap, self._ids, self._index, self._commits = (
            arrays["heap"], arrays["ids"], arrays["index"], arrays["commits"])
        self._zs.sync_dirs()
        # leftovers of a killed flush: temp files are garbage; chunks without a record are never reused
        for sub in _ARRAYS:
            for p in (self.folder / sub).glob(f"*{TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
        last = max([-1] + _chunk_ids(self.folder / "commits") + _chunk_ids(self.folder / "index")
                   + _chunk_ids(self.folder / "ids"))
        self._next_seq = last + 1
        self._heap_pos = (max([-1] + _chunk_ids(self.folder / "heap")) + 1) * HEAP_CHUNK
        self._buf: list[tuple[bytes, int, int, bytes, int]] = []
        self._before_commit = None  # test hook: called after the chunks, before the commit records
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
        _set_many(writes)
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
        rec[R_INDEX_SIZE] = _size(self.folder / "index" / f"c.{seq}.0")
        rec[R_IDS_SIZE] = _size(self.folder / "ids" / f"c.{seq}")
        rec[R_HEAP_SIZE] = sum(_size(self.folder / "heap" / f"c.{k}")
                               for k in range(hs // HEAP_CHUNK, (hs + p["padded"]) // HEAP_CHUNK))
        rec[R_OLDEST_NS] = p["oldest_ns"]
        rec[R_ROWS_CRC] = p["rows_crc"]
        rec[R_TIME_NS] = time.time_ns()
        return rec
