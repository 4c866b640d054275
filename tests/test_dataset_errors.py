"""Bad datasets: what the loader refuses before anything starts (with file and line), and what
fails one row only at run time (naming the row's file, line and id)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import deadline

from matrix_hpc import load_job, run
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.job.dataset import iter_rows
from matrix_hpc.job.dataset_checks import DIGEST_CACHE
from matrix_hpc.job.load import JobFileError
from matrix_hpc.runtime.agent_actor import payload_class
from matrix_hpc.runtime.message import TaskFactory
from matrix_hpc.store import RunStore

AGENTS = "from matrix_hpc import DONE\nasync def f(item, ctx):\n    return DONE\n"
ROLES = {"f": {"agent": "agents:f"}}
FROM_ROW = {"from_row": {"text": "text", "n": "n"}}


def rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "text": f"row {i}", "n": i} for i in range(n)]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def refusal(path: Path, **kw) -> str:
    with pytest.raises(JobFileError) as e:
        load_job(path, **kw)
    return str(e.value)


# ---- refused at load, before Ray ----------------------------------------------------------------

def test_a_from_row_column_the_dataset_lacks_is_refused_at_load(make_job):
    path = make_job(AGENTS, ROLES, "f", rows=5, payload={"from_row": {"text": "text", "n": "count"}})
    msg = refusal(path)
    data = path.parent / "data.jsonl"
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"n": "count"' in t)
    assert msg.startswith(f"{path}:{line}: payload.from_row.n: column 'count' is in none of the first 5 rows "
                          f"of {data} (lines 1-5); columns there: id, n, text"), msg


def test_an_id_field_no_row_has_is_refused_at_load(make_job):
    path = make_job(AGENTS, ROLES, "f", rows=3, dataset={"id_field": "key"})
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"id_field"' in t)
    assert refusal(path).startswith(f"{path}:{line}: dataset.id_field: column 'key' is in none of the first 3 rows")


def test_a_parquet_column_is_looked_for_in_its_schema(make_job):
    path = make_job(AGENTS, ROLES, "f", rows=1, dataset={"path": "data.parquet"},
                    payload={"from_row": {"text": "body"}})
    pq.write_table(pa.Table.from_pylist(rows(4)), path.parent / "data.parquet")
    assert f"column 'body' is in none of the columns of {path.parent / 'data.parquet'}; columns there: id, n, text" \
        in refusal(path)


def test_duplicate_ids_are_refused_at_load_naming_both_lines(make_job):
    data = rows(8)
    data[6]["id"] = "r2"
    data[7]["id"] = 3  # the source's ids are str(value): 3 and "3" would be one task
    data[5]["id"] = "3"
    path = make_job(AGENTS, ROLES, "f", rows=data)
    msg = refusal(path)
    jsonl = path.parent / "data.jsonl"
    assert f"2 duplicate row id(s): 'r2' at {jsonl}:3 and at {jsonl}:7; '3' at {jsonl}:6 and at {jsonl}:8; " \
           "each row needs its own 'id'" in msg, msg
    assert msg.startswith(f"{path}:"), msg


def test_duplicates_past_the_limit_do_not_count(make_job):
    data = rows(6)
    data[5]["id"] = "r0"
    path = make_job(AGENTS, ROLES, "f", rows=data, dataset={"limit": 5})
    assert load_job(path).spec.dataset.limit == 5
    path.write_text(path.read_text().replace('"limit": 5', '"limit": 6'))
    assert f"'r0' at {path.parent / 'data.jsonl'}:1 and at {path.parent / 'data.jsonl'}:6" in refusal(path)


def test_duplicate_ids_in_parquet_name_row_group_and_row(make_job):
    path = make_job(AGENTS, ROLES, "f", rows=1, dataset={"path": "data.parquet"})
    data = rows(10)
    data[8]["id"] = "r1"
    pq.write_table(pa.Table.from_pylist(data), path.parent / "data.parquet", row_group_size=4)
    parquet = path.parent / "data.parquet"
    assert f"'r1' at {parquet}: row group 0, row 1 and at {parquet}: row group 2, row 0" in refusal(path)


def test_a_yaml_tag_that_builds_python_objects_is_a_job_file_error(make_job):
    path = make_job(AGENTS, ROLES, "f", rows=2)
    path.write_text(path.read_text().replace('"name": "t"', '"name": !!python/object/apply:os.getcwd []'))
    assert refusal(path).startswith(f"{path}:2: YAML tag not allowed here: could not determine a constructor "
                                    "for the tag 'tag:yaml.org,2002:python/object/apply:os.getcwd'")


# ---- the resume fingerprint -------------------------------------------------------------------

def test_an_edit_in_the_middle_of_the_dataset_changes_the_fingerprint(make_job, tmp_path):
    path = make_job(AGENTS, ROLES, "f", rows=rows(3) + [{"id": f"x{i}", "text": "y" * 4000, "n": i} for i in range(600)])
    data = path.parent / "data.jsonl"
    before = load_job(path, run_dir=tmp_path / "a").fingerprint
    raw = data.read_bytes()
    middle = raw.index(b'"x300"')
    data.write_bytes(raw[:middle] + b'"X300"' + raw[middle + 6:])  # same size, 1.2 MB from either end
    after = load_job(path, run_dir=tmp_path / "b").fingerprint
    assert [k for k in before if before[k] != after[k]] == ["dataset"]


def test_the_digest_is_cached_by_file_identity_in_the_run_dir(make_job, tmp_path):
    path = make_job(AGENTS, ROLES, "f", rows=20)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real = load_job(path, run_dir=run_dir).fingerprint["dataset"]
    cache = run_dir / DIGEST_CACHE
    saved = json.loads(cache.read_text())
    assert saved["sha256"] == real and saved["key"]["size"] == (path.parent / "data.jsonl").stat().st_size
    cache.write_text(json.dumps({**saved, "sha256": "from-the-cache"}))
    assert load_job(path, run_dir=run_dir).fingerprint["dataset"] == "from-the-cache"  # the file was not read
    os.utime(path.parent / "data.jsonl", ns=(1, 1))
    assert load_job(path, run_dir=run_dir).fingerprint["dataset"] == real  # a new mtime: read again


# ---- what fails one row only, at run time ------------------------------------------------------

def test_bad_rows_fail_alone_and_name_file_line_and_id(ray_session, make_job):
    path = make_job(AGENTS, ROLES, "f", rows=1, payload=FROM_ROW)
    data = path.parent / "data.jsonl"
    good = [json.dumps(r).encode() for r in rows(10)]
    write_lines(data, [
        good[0],
        b'{"id": "r1", "text": "caf\xe9", "n": 1}',  # latin-1, not UTF-8
        good[2],
        b"",  # blank lines are skipped but counted in line numbers
        b'{"id": "r3", "text": "x", "n": }',
        b'{"id": "r4", "text": "no n"}',
        b'{"text": "no id", "n": 5}',
        good[6], good[7],
        b'{"id": "r8", "text": "x", "n": "eight"}',
        good[9],
    ])
    job = load_job(path)
    with deadline(120):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (5, 5)
    errors = {}
    for data_ in RunStore.open(job.run_dir).iter_results(status=task_pb2.TASK_STATUS_FAILED):
        t = task_pb2.Task.FromString(data_)
        errors[t.task_id] = (t.error.role, t.error.message)
    assert {tid: role for tid, (role, _) in errors.items()} == {
        "1#0": "source", "3#0": "source", "r4#0": "source", "5#0": "source", "r8#0": "source"}  # no id: the row index
    msg = {tid: m for tid, (_, m) in errors.items()}
    assert msg["1#0"] == f"RowError: {data}:2: row without a readable id: not valid UTF-8: byte b'\\xe9' at column 26"
    assert msg["3#0"] == f"RowError: {data}:5: row without a readable id: invalid JSON: Expecting value (column 32)"
    assert msg["r4#0"] == f"RowError: {data}:6: row id 'r4': row has no column(s) ['n'] named in payload.from_row"
    assert msg["5#0"] == f"RowError: {data}:7: row without a readable id: no id field 'id'"
    assert msg["r8#0"].startswith(f"RowError: {data}:10: row id 'r8': ParseError: "), msg["r8#0"]


def test_a_parquet_row_error_names_its_row_group_and_row(make_job):
    path = make_job(AGENTS, ROLES, "f", rows=1, dataset={"path": "data.parquet"}, payload=FROM_ROW)
    data = [{"id": f"r{i}", "text": f"t{i}", "n": str(i)} for i in range(7)]
    data[5]["n"] = "five"
    pq.write_table(pa.Table.from_pylist(data), path.parent / "data.parquet", row_group_size=3)
    job = load_job(path)
    factory = TaskFactory(job.spec, payload_class(job), None)
    tasks = [factory.new(index, row, 0, where) for index, row, where in iter_rows(job.dataset_path)]
    failed = [t for t in tasks if t.status == task_pb2.TASK_STATUS_FAILED]
    assert [t.task_id for t in failed] == ["r5#0"]
    assert failed[0].error.message.startswith(
        f"RowError: {job.dataset_path}: row group 1, row 2: row id 'r5': ParseError: "), failed[0].error.message
