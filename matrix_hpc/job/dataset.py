"""Read a job's dataset rows (JSONL or Parquet), streaming, in file order.

Every row comes with where it is (``file:line`` for JSONL, ``file: row group G, row R`` for
Parquet) so that an error about a row can name it. A row that cannot be read (invalid JSON,
bytes that are not UTF-8, not an object) fails its own task only; the run goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Row = dict[str, Any]


class RowError(Exception):
    """A row that cannot be read or turned into a task; the task for it fails, the run goes on."""


def iter_rows(path: Path, limit: int | None = None) -> Iterator[tuple[int, Row | RowError, str]]:
    """Yield (row index, row, location) triples; a row that cannot be parsed comes as a RowError."""
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    for index, (row, where) in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield index, row, where


def count_rows(path: Path, limit: int | None = None) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
    else:
        n = sum(1 for _ in jsonl_lines(path))
    return n if limit is None else min(n, limit)


def row_failure(exc: BaseException, where: str, row_id: str | None) -> RowError:
    """``exc`` (raised while turning a row into a task) as a RowError naming the row's place and id."""
    what = str(exc) if isinstance(exc, RowError) else f"{type(exc).__name__}: {exc}"
    who = f"row id {row_id!r}" if row_id is not None else "row without a readable id"
    err = RowError(f"{where}: {who}: {what}")
    err.__cause__ = exc
    return err


def parse_jsonl_line(line: bytes) -> Row | RowError:
    """One JSONL line as a row, or the RowError saying why it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError(f"not valid UTF-8: byte {line[e.start:e.start + 1]!r} at column {e.start + 1}")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return RowError(f"invalid JSON: {e.msg} (column {e.colno})")
    return row if isinstance(row, dict) else RowError(f"a row must be a JSON object, not {type(row).__name__}")


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line; a UTF-8 byte order mark on line 1 is dropped."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if line.strip():
                yield lineno, line


def _jsonl_rows(path: Path) -> Iterator[tuple[Row | RowError, str]]:
    for lineno, line in jsonl_lines(path):
        yield parse_jsonl_line(line), f"{path}:{lineno}"


def parquet_where(path: Path, group: int, row: int) -> str:
    return f"{path}: row group {group}, row {row}"


def _parquet_rows(path: Path) -> Iterator[tuple[Row, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for group in range(pf.num_row_groups):
        offset = 0
        for batch in pf.iter_batches(batch_size=1024, row_groups=[group]):
            for i, row in enumerate(batch.to_pylist()):
                yield row, parquet_where(path, group, offset + i)
            offset += batch.num_rows
