"""Reading and writing whole zarr chunks fast: our own decoder for our own codecs, and
concurrent writes of many chunks in one trip to zarr's event loop."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import Zstd

from matrix_hpc._compat import zarr_sync

_FAST_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 1, "checksum": False}}, {"name": "crc32c"}]
_FAST_CODECS_1B = [{"name": "bytes"}] + _FAST_CODECS[1:]  # one-byte types have no endianness
_ZSTD = Zstd()

log = logging.getLogger("matrix_hpc.store")


def fast_readable(arr) -> bool:
    """Whether the chunks of ``arr`` are exactly what decode_chunk_file decodes."""
    meta = arr.metadata
    try:
        return ([c.to_dict() for c in meta.codecs] in (_FAST_CODECS, _FAST_CODECS_1B)
                and meta.chunk_key_encoding.to_dict() == {"name": "default",
                                                          "configuration": {"separator": "."}}
                and sys.byteorder == "little")
    except Exception:  # noqa: BLE001 - codecs we do not know (no to_dict, other fields): zarr reads them
        return False


def decode_chunk_file(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
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


def read_chunks(arr, seqs: list[int], folder: Path | None = None,
                 run: int = 256) -> dict[int, np.ndarray | None]:
    """Whole chunks ``seqs`` (along axis 0) of ``arr``; None for a chunk that does not decode.

    With ``folder`` (the array's folder) and our own codecs, chunk files are decoded directly.
    Otherwise consecutive chunks are read with one zarr slice (read concurrently); after a
    decode error (a torn chunk) the run is read again chunk by chunk to isolate it. Slices
    only: zarr's integer-array indexing costs memory in the number of chunks, and ours are huge.
    """
    c = arr.chunks[0]
    out: dict[int, np.ndarray | None] = {}
    if folder is not None and fast_readable(arr):
        suffix = ".0" * (arr.ndim - 1)
        for s in seqs:
            try:
                out[s] = decode_chunk_file(folder / f"c.{s}{suffix}", arr.chunks, arr.dtype)
            except Exception as e:  # noqa: BLE001 - missing, torn or damaged: the caller counts it as torn
                _unreadable(folder, s, e)
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
        except Exception:  # noqa: BLE001 - a torn chunk somewhere in the run: read them one by one to find it
            for s in r:
                try:
                    out[s] = arr[s * c:(s + 1) * c]
                except Exception as e:  # noqa: BLE001 - missing, torn or damaged: the caller counts it as torn
                    _unreadable(folder, s, e)
                    out[s] = None
    return out


def _unreadable(folder: Path | None, seq: int, error: Exception) -> None:
    log.info("%s: chunk %d does not decode (%s: %s); read as missing", folder or "array", seq,
             type(error).__name__, error)


def set_many(writes: list) -> None:
    """``arr[sel] = value`` for each (arr, sel, value), concurrently, in one trip to zarr's loop."""

    async def go():
        await asyncio.gather(*(arr.async_array.setitem(sel, val) for arr, sel, val in writes))

    zarr_sync(go())

