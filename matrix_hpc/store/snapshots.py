"""In-flight snapshots: ``store.zarr/snapshots/<seq>/`` (heap + offsets), attrs.complete written last."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from matrix_hpc.store._durable import DurableLocalStore
from matrix_hpc.store.layout import (
    ARRAY_CONFIG,
    CHUNK_NAME,
    KEY_ENCODING,
    SNAPSHOT_CHUNK,
    SNAPSHOTS_KEPT,
    compressors,
    file_size,
    now_iso,
)

_COMPLETE_KEYS = {"n_tasks", "nbytes", "time", "unix_time", "sizes"}  # written with complete: true


class Snapshots:
    """The snapshots of one store; writes go through the store's durable zarr store."""

    def __init__(self, store_path: Path, write_store: Callable[[], DurableLocalStore]):
        self.folder = store_path / "snapshots"
        self._write_store = write_store
        self.before_commit: Callable[[], None] | None = None  # test hook: arrays written, not yet complete

    def _seqs(self) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def write(self, tasks: list[bytes], *, meta: dict, keep: int = SNAPSHOTS_KEPT) -> None:
        """Store the serialized in-flight tasks as a new snapshot, atomically.

        The snapshot's arrays are written first, then its group attributes with
        ``complete: true`` (one atomic rename): a crash before that leaves the previous
        snapshot as the latest. The newest ``keep`` complete snapshots are kept.
        """
        t0 = time.time()
        seqs = self._seqs()
        seq = (seqs[-1] + 1) if seqs else 1
        name = f"snapshots/{seq:010d}"
        zs = self._write_store()
        lens = np.fromiter((len(t) for t in tasks), dtype=np.int64, count=len(tasks))
        offsets = np.zeros(len(tasks) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        heap = np.frombuffer(b"".join(tasks), dtype=np.uint8)
        grp = zarr.open_group(zs, mode="r+").create_group(name, attributes={"complete": False})
        common = dict(fill_value=0, compressors=compressors(), chunk_key_encoding=KEY_ENCODING, config=ARRAY_CONFIG)
        h = grp.create_array("heap", shape=heap.shape, chunks=(SNAPSHOT_CHUNK,), dtype="uint8", **common)
        if heap.size:
            h[:] = heap
        o = grp.create_array("offsets", shape=offsets.shape, chunks=(1 << 20,), dtype="int64", **common)
        o[:] = offsets
        folder = self.folder / f"{seq:010d}"
        sizes = {f"{a}/{c}": file_size(folder / a / c) for a in ("heap", "offsets")
                 for c in os.listdir(folder / a) if CHUNK_NAME.match(c)}
        zs.sync_dirs()
        t1 = time.time()
        if self.before_commit:
            self.before_commit()
        grp.attrs.update({"complete": True, "n_tasks": len(tasks), "nbytes": int(heap.size),
                          "time": now_iso(t1), "unix_time": t1, "write_seconds": round(t1 - t0, 4),
                          "sizes": sizes, "meta": meta})
        zs.sync_dirs()
        self._drop_old(seq, keep)

    def _attrs(self, seq: int) -> dict | None:
        folder = self.folder / f"{seq:010d}"
        try:
            attrs = json.loads((folder / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            return None
        if attrs.get("complete") is not True or not _COMPLETE_KEYS <= attrs.keys():
            return None
        for key, size in attrs.get("sizes", {}).items():
            if file_size(folder / key) != size:
                return None
        return attrs

    def _drop_old(self, latest: int, keep: int) -> None:
        """Keep ``latest`` and the ``keep - 1`` newest complete ones before it; remove the rest."""
        kept = 1
        for s in reversed(self._seqs()):
            if s >= latest:
                continue
            if kept < keep and self._attrs(s) is not None:
                kept += 1
                continue
            shutil.rmtree(self.folder / f"{s:010d}", ignore_errors=True)

    def latest_attrs(self) -> tuple[int, dict] | None:
        for s in reversed(self._seqs()):
            a = self._attrs(s)
            if a is not None:
                return s, a
        return None

    def latest(self) -> tuple[list[bytes], dict] | None:
        """(serialized tasks, meta) of the newest complete snapshot, or None.

        ``meta`` is what was passed to ``write`` plus ``time`` (ISO, UTC), ``unix_time``,
        ``n_tasks`` and ``seq``.
        """
        for s in reversed(self._seqs()):
            attrs = self._attrs(s)
            if attrs is None:
                continue
            try:
                grp = zarr.open_group(LocalStore(self.folder / f"{s:010d}", read_only=True), mode="r")
                offsets = grp["offsets"][:]
                heap = grp["heap"][:].tobytes() if grp["heap"].shape[0] else b""
            except Exception:  # noqa: BLE001 - removed under us by a newer snapshot, or damaged: try the previous
                continue
            if len(offsets) != attrs["n_tasks"] + 1 or int(offsets[-1]) != len(heap):
                continue
            o = offsets.tolist()
            tasks = [heap[o[i]:o[i + 1]] for i in range(len(o) - 1)]
            meta = dict(attrs.get("meta", {}))
            meta.update(time=attrs["time"], unix_time=attrs["unix_time"], n_tasks=attrs["n_tasks"], seq=s)
            return tasks, meta
        return None
