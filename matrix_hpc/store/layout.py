"""The run directory's layout: file names, zarr array shapes, the commit record's fields.

Everything here is format: changing a value changes what older run directories mean.
See docs/store.md for the picture.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from zarr.codecs import Crc32cCodec, ZstdCodec

from matrix_hpc._gen.v1 import task_pb2

# The files of the run directory are named by its owner, matrix_hpc.rundir.
from matrix_hpc.rundir import DESC_FILE, EVENTS_FILE, FINGERPRINT_FILE, JOB_FILE, LOGS_DIR, STORE_NAME  # noqa: F401 - the format names them

DONE = task_pb2.TASK_STATUS_DONE
FAILED = task_pb2.TASK_STATUS_FAILED

FORMAT = "matrix-hpc-run-store"
FORMAT_VERSION = 1


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

WRITER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CHUNK_NAME = re.compile(r"^c\.(\d+)(?:\.0)?$")


class StoreError(Exception):
    """The run directory is missing, not a run store, or cannot be written as asked."""


def compressors() -> list:
    return [ZstdCodec(level=1), Crc32cCodec()]


KEY_ENCODING = {"name": "default", "separator": "."}  # all chunk files of an array in one folder
ARRAY_CONFIG = {"write_empty_chunks": True}  # a chunk of zeros is still a chunk we committed

ARRAYS = {
    "heap": dict(shape=(HEAP_SHAPE,), chunks=(HEAP_CHUNK,), dtype="uint8"),
    "ids": dict(shape=(HEAP_SHAPE,), chunks=(IDS_CHUNK,), dtype="uint8"),
    "index": dict(shape=(INDEX_SHAPE, INDEX_COLS), chunks=(ROWS_PER_SEGMENT, INDEX_COLS), dtype="int64"),
    "commits": dict(shape=(INDEX_SHAPE, RECORD_WIDTH), chunks=(1, RECORD_WIDTH), dtype="int64"),
}


def now_iso(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def chunk_ids(folder: Path) -> list[int]:
    """Chunk numbers of the chunk files in an array folder (temp files ignored)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for m in map(CHUNK_NAME.match, names) if m]


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1
