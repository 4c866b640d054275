"""What the loader checks in a dataset before a run starts, and the dataset's content digest.

* The columns a job names (``payload.from_row``, ``dataset.id_field``) are looked for in the
  first rows (the schema, for Parquet): a column none of them has is a job-file error. Every
  column found there must fill a payload field, be the id field or be in
  ``dataset.ignore_columns`` (a misspelt column would otherwise leave its field empty).
* One streamed pass over the file computes a SHA-256 of its bytes (the resume fingerprint: any
  edit anywhere is noticed) and checks that no two rows share an id. Its result is cached in
  the run directory under the file's (path, size, mtime_ns, inode), so resuming a run on an
  unchanged dataset reads nothing again (benchmarks/bench_dataset.py measures the cost).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

from matrix_hpc.job.dataset import jsonl_lines, parquet_where, parse_jsonl_line
from matrix_hpc.job.yamlpos import JobFileError, YamlWithLines
from matrix_hpc.rundir import DIGEST_CACHE

SAMPLE_ROWS = 100
_BLOCK = 8 << 20


def column_fields(spec, desc) -> dict[str, str] | None:
    """Dataset column -> the payload field it fills (``desc``: the payload's message descriptor);
    None when ``payload.builder`` reads the rows (then the builder decides)."""
    if spec.payload.builder:
        return None
    if spec.payload.from_row is not None:
        return {col: f for f, col in spec.payload.from_row.items()}
    return {name: f.name for f in desc.fields for name in (f.name, f.json_name)}


def unused_columns(spec, fills: dict[str, str], columns) -> list[str]:
    """The columns that fill no payload field and are neither the id field nor ignored."""
    known = set(fills) | set(spec.dataset.ignore_columns) | {spec.dataset.id_field}
    return [c for c in columns if c not in known]


def check_columns(doc: YamlWithLines, spec, path: Path, desc) -> list[str]:
    """Refuse a ``from_row`` column or an id field that none of the dataset's first rows has, and a
    column there that fills no payload field (unless in ``dataset.ignore_columns``). Return the
    payload fields that no column fills (left for the agents)."""
    wanted = {("dataset", "id_field"): spec.dataset.id_field} if spec.dataset.id_field else {}
    if spec.payload.from_row and not spec.payload.builder:
        wanted |= {("payload", "from_row", f): col for f, col in spec.payload.from_row.items()}
    fills = column_fields(spec, desc)
    if not wanted and fills is None:
        return []
    columns, seen = _sample_columns(path)
    for loc, col in wanted.items():
        if col not in columns:
            have = ", ".join(sorted(columns)) or "none"
            raise JobFileError(f"{doc.where(loc)}: column {col!r} is in none of {seen}; columns there: {have}")
    if fills is None:
        return []
    filled = {fills[c] for c in columns if c in fills}
    unfilled = [f.name for f in desc.fields if f.name not in filled]
    unused = unused_columns(spec, fills, columns)
    if unused:
        raise JobFileError("\n".join(_unused_column(doc, spec, desc, col, columns[col], unfilled) for col in unused))
    return unfilled


def _unused_column(doc: YamlWithLines, spec, desc, col: str, where: str, unfilled: list[str]) -> str:
    fields = [f.name for f in desc.fields]
    close = difflib.get_close_matches(col, unfilled, n=1) or difflib.get_close_matches(col, fields, n=1)
    if spec.payload.from_row is not None:
        hint = (f"payload.from_row is given, so only the columns it names fill the payload; "
                f"map it there ({close[0] if close else 'FIELD'}: {col})")
    elif close:
        hint = f"did you mean the field {close[0]!r}? Rename the column, or map it: payload.from_row"
    else:
        hint = f"{desc.full_name}'s fields: {', '.join(fields)}; map it with payload.from_row"
    return (f"{doc.where(('dataset', 'path'))}: column {col!r} ({where}) fills no field of {desc.full_name}: "
            f"{hint}, or list it in dataset.ignore_columns to leave it out")


def _sample_columns(path: Path) -> tuple[dict[str, str], str]:
    """The columns of the dataset (Parquet schema, or keys of the first JSONL rows), each with where
    it was first seen, and what was read."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {c: f"{path} schema" for c in pq.ParquetFile(path).schema_arrow.names}, f"the columns of {path}"
    columns: dict[str, str] = {}
    first = last = 0
    for n, (lineno, line) in enumerate(jsonl_lines(path)):
        if n == SAMPLE_ROWS:
            break
        first, last = first or lineno, lineno
        row = parse_jsonl_line(line)
        if isinstance(row, dict):
            for c in row:
                columns.setdefault(c, f"{path}:{lineno}")
    if not last:
        return columns, f"the rows of {path} (it has none)"
    return columns, f"the first {min(n + 1, SAMPLE_ROWS)} rows of {path} (lines {first}-{last})"


# ---- the content digest and the duplicate-id check --------------------------------------------

def dataset_digest(doc: YamlWithLines, spec, path: Path, run_dir: Path) -> str:
    """SHA-256 (hex, 32 chars) of the dataset's bytes; raises JobFileError if two rows share an id.

    Reuses the result cached in ``run_dir`` when the file's identity has not changed.
    """
    key = _identity(path, spec.dataset.id_field, spec.dataset.limit)
    cache = run_dir / DIGEST_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = _scan(doc, spec, path)
    _unsaved[run_dir] = (key, digest)
    if os.path.isdir(run_dir):  # False too where the user cannot reach it: the preflight says so
        save_digest(run_dir)
    return digest


_unsaved: dict[Path, tuple[dict, str]] = {}  # run dir -> digest computed before the run dir existed


def save_digest(run_dir: Path) -> None:
    """Cache in ``run_dir`` the digest computed for it by this process, if not done yet."""
    if run_dir not in _unsaved:
        return
    key, digest = _unsaved.pop(run_dir)
    tmp = run_dir / f".{DIGEST_CACHE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"key": key, "sha256": digest}, indent=2) + "\n")
        tmp.replace(run_dir / DIGEST_CACHE)
    except OSError:  # a cache only: a read-only or full run directory costs a re-read next time
        tmp.unlink(missing_ok=True)


def _identity(path: Path, id_field: str | None, limit: int | None) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
            "id_field": id_field, "limit": limit}


def _scan(doc: YamlWithLines, spec, path: Path) -> str:
    field, limit = spec.dataset.id_field, spec.dataset.limit
    if field is None:  # row ids are row indexes: unique by construction
        return _sha256_of(path)
    hashing = _HashingReader(path)
    ids = _jsonl_ids(hashing, field, limit) if path.suffix != ".parquet" else _parquet_ids(path, field, limit)
    places, id_hashes = array("q"), array("q")
    for place, rid in ids:
        places.append(place)
        id_hashes.append(hash(rid))
    digest = hashing.finish() if path.suffix != ".parquet" else _sha256_of(path)
    _refuse_duplicates(doc, path, field, limit, places, id_hashes)
    return digest


def _sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


class _HashingReader:
    """The file's lines, hashing every byte read (so one pass gives both lines and digest)."""

    def __init__(self, path: Path):
        self.path = path
        self.sha = hashlib.sha256()

    def lines(self) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            rest = b""
            while block := f.read(_BLOCK):
                self.sha.update(block)
                *whole, rest = (rest + block).split(b"\n")
                yield from whole
            if rest:
                yield rest

    def finish(self) -> str:
        return self.sha.hexdigest()[:32]


def _jsonl_ids(reader: _HashingReader, field: str, limit: int | None) -> Iterator[tuple[int, str]]:
    """(line number, row id) of every row, with the same ids the source gives tasks."""
    index = 0
    for lineno, line in enumerate(reader.lines(), 1):
        if lineno == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if not line.strip():
            continue
        if limit is None or index < limit:
            row = parse_jsonl_line(line)
            yield lineno, str(row[field]) if isinstance(row, dict) and field in row else str(index)
        index += 1  # reading on to the end: the digest covers every byte


def _parquet_ids(path: Path, field: str, limit: int | None) -> Iterator[tuple[int, str]]:
    """(row index, row id) of every row."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        return
    index = 0
    for batch in pf.iter_batches(batch_size=65536, columns=[field]):
        for value in batch.column(0).to_pylist():
            if limit is not None and index >= limit:
                return
            yield index, str(value)
            index += 1


def _refuse_duplicates(doc: YamlWithLines, path: Path, field: str, limit: int | None,
                       places: array, id_hashes: array) -> None:
    import numpy as np

    hashes = np.frombuffer(id_hashes, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    same = np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]
    if not same.size:
        return
    suspects = {int(places[i]) for j in same for i in (order[j], order[j + 1])}
    ids = _ids_at(path, field, limit, suspects)  # hashes may collide: compare the ids themselves
    first: dict[str, int] = {}
    pairs = []
    for place in sorted(ids):
        rid = ids[place]
        if rid in first:
            pairs.append((rid, first[rid], place))
        else:
            first[rid] = place
    if not pairs:
        return
    place = _parquet_place(path) if path.suffix == ".parquet" else lambda n: f"{path}:{n}"
    shown = "; ".join(f"{rid!r} at {place(a)} and at {place(b)}" for rid, a, b in pairs[:5])
    more = f" (and {len(pairs) - 5} more)" if len(pairs) > 5 else ""
    raise JobFileError(f"{doc.where(('dataset', 'id_field'))}: {len(pairs)} duplicate row id(s): "
                       f"{shown}{more}; each row needs its own {field!r}")


def _parquet_place(path: Path):
    """Row index -> ``file: row group G, row R``."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    def place(index: int) -> str:
        group = 0
        while index >= sizes[group]:
            index -= sizes[group]
            group += 1
        return parquet_where(path, group, index)

    return place


def _ids_at(path: Path, field: str, limit: int | None, places: set[int]) -> dict[int, str]:
    if path.suffix == ".parquet":
        return {i: rid for i, rid in _parquet_ids(path, field, limit) if i in places}
    return {n: rid for n, rid in _jsonl_ids(_HashingReader(path), field, limit) if n in places}
