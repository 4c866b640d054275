"""Read a job's dataset rows (JSONL or Parquet), streaming, in file order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RowError(Exception):
    """A row that cannot be read; the task for it fails, the run goes on."""


def iter_rows(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield (row index, row) pairs; a row that cannot be parsed comes as a RowError."""
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield index, row


def count_rows(path: Path, limit: int | None = None) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
    else:
        with path.open("rb") as f:
            n = sum(1 for line in f if line.strip())
    return n if limit is None else min(n, limit)


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any] | RowError]:
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield RowError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
                continue
            yield row if isinstance(row, dict) else RowError(f"{path}:{lineno}: a row must be a JSON object")


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()
