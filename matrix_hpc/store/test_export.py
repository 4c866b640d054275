"""Export (JSONL, Parquet) with a real compiled payload proto, and the export/status commands."""

from __future__ import annotations

import importlib
import json
import sys
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.cli import main
from matrix_hpc.protogen import compile_protos
from matrix_hpc.store import DONE, FAILED, RunStore, StoreError, export

PROTO = """
syntax = "proto3";
package storetest.v1;
import "google/protobuf/timestamp.proto";

message Score { double value = 1; string judge = 2; }
enum Verdict { VERDICT_UNSPECIFIED = 0; VERDICT_OK = 1; VERDICT_BAD = 2; }
message Sample {
  string question = 1;
  repeated string turns = 2;
  int64 tokens = 3;
  Score score = 4;
  map<string, string> tags = 5;
  Verdict verdict = 6;
  google.protobuf.Timestamp finished = 7;
  string trial = 8;  // collides with the export's own column on purpose
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("proto")
    (d / "store_sample.proto").write_text(PROTO)
    desc = d / "payload.desc"
    compile_protos(d, [d / "store_sample.proto"], d / "gen", descriptor_set=desc)
    sys.path.insert(0, str(d / "gen"))
    try:
        mod = importlib.import_module("store_sample_pb2")
    finally:
        sys.path.remove(str(d / "gen"))
    return mod, desc.read_bytes()


def _task(mod, i: int, status: int) -> task_pb2.Task:
    s = mod.Sample(question=f"q{i}", turns=[f"t{j}" for j in range(i % 3)], tokens=10**12 + i,
                   verdict=mod.VERDICT_OK if i % 2 else mod.VERDICT_UNSPECIFIED, trial=f"p{i}")
    if i % 4:
        s.score.value = i / 2
        s.score.judge = "j"
    if i % 3 == 0:
        s.tags["lang"] = "en"
    s.finished.FromSeconds(1_700_000_000 + i)
    t = task_pb2.Task(task_id=f"row{i}#0", row_index=i, row_id=f"row{i}", trial=0, status=status,
                      next_role="done", trace=["ask"] * (1 + i % 2) + ["judge"], retries=i % 3)
    t.payload.Pack(s)
    if status == FAILED:
        t.error.role = "judge"
        t.error.message = "ValueError: bad"
        t.error.step = 3
    return t


@pytest.fixture
def run(tmp_path, compiled):
    mod, desc = compiled
    store = RunStore.create(tmp_path / "run", job_yaml="x: 1\n", descriptor_set=desc,
                            payload_type="storetest.v1.Sample", fingerprint={"job": "1"}, total_tasks=60)
    w = store.writer("sink-0")
    for i in range(50):
        st = FAILED if i % 10 == 7 else DONE
        w.append(f"row{i}#0", i, st, _task(mod, i, st).SerializeToString())
    w.flush()
    store.write_snapshot([_task(mod, 99, DONE).SerializeToString()] * 4, meta={"reason": "test"})
    return tmp_path / "run"


def test_export_jsonl(run, tmp_path, compiled):
    mod, _ = compiled
    n = export(run, tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == len(rows) == 45
    r = next(r for r in rows if r["task_id"] == "row5#0")
    assert r == {"question": "q5", "turns": ["t0", "t1"], "tokens": 10**12 + 5,
                 "score": {"value": 2.5, "judge": "j"}, "tags": {}, "verdict": "VERDICT_OK",
                 "finished": "2023-11-14T22:13:25Z", "trial": "p5", "task_id": "row5#0",
                 "row_id": "row5", "row_index": 5, "matrix_trial": 0, "retries": 2}
    r0 = next(r for r in rows if r["row_index"] == 0)
    assert "score" not in r0 and r0["tags"] == {"lang": "en"} and r0["verdict"] == "VERDICT_UNSPECIFIED"
    # the payload decodes back to the message it was
    back = mod.Sample()
    from google.protobuf import json_format
    json_format.ParseDict({k: v for k, v in r.items() if k in mod.Sample.DESCRIPTOR.fields_by_name}, back)
    assert back == mod.Sample.FromString(_task(mod, 5, DONE).payload.value)

    n = export(run, tmp_path / "failed.jsonl", failed=True)
    rows = [json.loads(line) for line in (tmp_path / "failed.jsonl").read_text().splitlines()]
    assert n == 5 and {r["row_index"] for r in rows} == {7, 17, 27, 37, 47}
    assert rows[0]["error"] == {"role": "judge", "message": "ValueError: bad", "traceback": "",
                                "step": 3, "attempts": 0}


def test_export_parquet(run, tmp_path):
    n = export(run, tmp_path / "out.parquet", format="parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert n == table.num_rows == 45
    rows = {r["task_id"]: r for r in table.to_pylist()}
    assert rows["row5#0"]["score"] == {"value": 2.5, "judge": "j"}
    assert rows["row0#0"]["score"] is None and rows["row1#0"]["turns"] == ["t0"]
    assert rows["row5#0"]["tokens"] == 10**12 + 5
    assert rows["row0#0"]["tags"] == [{"key": "lang", "value": "en"}] and rows["row5#0"]["tags"] == []
    assert rows["row5#0"]["verdict"] == "VERDICT_OK" and rows["row5#0"]["trial"] == "p5"
    assert rows["row5#0"]["matrix_trial"] == 0 and rows["row5#0"]["row_index"] == 5
    assert [rows[f"row{i}#0"]["retries"] for i in range(3)] == [0, 1, 2]
    assert rows["row5#0"]["finished"] == datetime.fromtimestamp(1_700_000_005, UTC)
    jl = [json.loads(x) for x in (tmp_path / "x.jsonl").read_text().splitlines()] if export(
        run, tmp_path / "x.jsonl") else []
    assert sorted(r["task_id"] for r in jl) == sorted(rows)
    with pytest.raises(StoreError, match="unknown export format"):
        export(run, tmp_path / "o.csv", format="csv")


EXPECTED_SCHEMA = pa.schema([
    ("question", pa.string()), ("turns", pa.list_(pa.string())), ("tokens", pa.int64()),
    ("score", pa.struct([("value", pa.float64()), ("judge", pa.string())])),
    ("tags", pa.list_(pa.struct([pa.field("key", pa.string(), nullable=False), ("value", pa.string())]))),
    ("verdict", pa.string()), ("finished", pa.timestamp("us", tz="UTC")), ("trial", pa.string()),
    pa.field("task_id", pa.string(), nullable=False), pa.field("row_id", pa.string(), nullable=False),
    pa.field("row_index", pa.uint64(), nullable=False), pa.field("matrix_trial", pa.uint32(), nullable=False),
    pa.field("retries", pa.uint32(), nullable=False),
])


def test_parquet_schema_comes_from_the_proto(run, compiled, tmp_path):
    """Same columns, order and types for a full export, an empty one and a second export."""
    export(run, tmp_path / "a.parquet", format="parquet")
    export(run, tmp_path / "b.parquet", format="parquet")
    mod, desc = compiled
    empty = RunStore.create(tmp_path / "empty", job_yaml="name: e\n", descriptor_set=desc,
                            payload_type="storetest.v1.Sample", fingerprint={}, total_tasks=0)
    assert export(empty.run_dir, tmp_path / "e.parquet", format="parquet") == 0
    schemas = [pq.read_schema(tmp_path / f"{n}.parquet").remove_metadata() for n in "abe"]
    assert schemas[0].equals(EXPECTED_SCHEMA), schemas[0]
    assert schemas[1].equals(EXPECTED_SCHEMA) and schemas[2].equals(EXPECTED_SCHEMA)
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0

    export(run, tmp_path / "f.parquet", format="parquet", failed=True)
    failed = pq.read_schema(tmp_path / "f.parquet")
    assert failed.names == [*EXPECTED_SCHEMA.names, "error"]
    assert failed.field("error").type == pa.struct([("role", pa.string()), ("message", pa.string()),
                                                    ("traceback", pa.string()), ("step", pa.uint32()),
                                                    ("attempts", pa.uint32())])


def test_parquet_loads_in_hugging_face_datasets_without_a_cast(run, tmp_path):
    datasets = pytest.importorskip("datasets")
    export(run, tmp_path / "out.parquet", format="parquet")
    ds = datasets.Dataset.from_parquet(str(tmp_path / "out.parquet"), cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 45 and ds.column_names == EXPECTED_SCHEMA.names
    assert ds.features["tokens"].dtype == "int64" and ds.features["matrix_trial"].dtype == "uint32"
    row = ds.filter(lambda r: r["task_id"] == "row5#0")[0]
    assert row["score"] == {"value": 2.5, "judge": "j"} and row["tokens"] == 10**12 + 5


def test_cli_export_and_status(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "parquet"]) == 0
    assert "wrote 45 row(s)" in capsys.readouterr().out
    assert pq.read_table(run / "results.parquet").num_rows == 45
    assert main(["export", str(run), "--failed", "-o", str(tmp_path / "f.jsonl")]) == 0
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 5
    capsys.readouterr()

    assert main(["status", str(run), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["done"], st["failed"], st["pending"], st["in_flight_at_last_checkpoint"]) == (45, 5, 10, 4)
    # steps and retries are those recorded in the 50 committed envelopes
    assert st["steps_by_role"] == {"ask": sum(1 + i % 2 for i in range(50)), "judge": 50}
    assert st["retries"] == sum(i % 3 for i in range(50))
    assert st["last_checkpoint_time"].endswith("Z")
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "done        45" in out and "in flight at the last checkpoint: 4" in out
    assert "steps       ask 75, judge 50" in out and "retries     49" in out

    assert main(["status", str(tmp_path)]) == 2
    assert "not a matrix-hpc run directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_results_since_a_mark_are_only_those_committed_after_it(run, compiled):
    mod, _ = compiled
    store = RunStore.open(run)
    mark = store.mark()
    w = store.writer("sink-1")
    w.append("row5#0", 5, DONE, _task(mod, 5, DONE).SerializeToString())  # a duplicate: counted once, before
    for i in (50, 51):
        w.append(f"row{i}#0", i, DONE, _task(mod, i, DONE).SerializeToString())
    w.flush()
    new = [task_pb2.Task.FromString(b).task_id for b in store.iter_results(since=mark)]
    assert new == ["row50#0", "row51#0"]
    counted = store.tally(since=mark)
    assert (counted.done, counted.failed, counted.retries) == (2, 0, 50 % 3 + 51 % 3)
    assert counted.steps == {"ask": 1 + 2, "judge": 2}
    assert store.tally().done == 47
