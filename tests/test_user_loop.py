"""The user's loop (issue 19): dataset columns checked against the payload at load, an exit status
that follows the run directory's contents, and failed rows rerun from their dataset rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import deadline

from matrix_hpc import load_job
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.cli import main
from matrix_hpc.job.load import JobFileError
from matrix_hpc.runtime.agent_actor import payload_class
from matrix_hpc.runtime.message import TaskFactory
from matrix_hpc.runtime.summary import Exit
from matrix_hpc.store import RunStore

AGENTS = "from matrix_hpc import DONE\nasync def f(item, ctx):\n    return DONE\n"
ROLES = {"f": {"agent": "agents:f"}}


def refusal(path: Path) -> str:
    with pytest.raises(JobFileError) as e:
        load_job(path)
    return str(e.value)


def line_of(path: Path, text: str) -> int:
    return next(i for i, t in enumerate(path.read_text().splitlines(), 1) if text in t)


# ---- 1. every column fills a field, is the id, or is ignored ------------------------------------

def test_a_misspelt_column_is_refused_naming_the_closest_field_and_the_key(make_job):
    rows = [{"id": f"r{i}", "txt": f"row {i}", "n": i} for i in range(3)]
    path = make_job(AGENTS, ROLES, "f", rows=rows)
    data, line = path.parent / "data.jsonl", line_of(path, '"path"')
    assert refusal(path) == (
        f"{path}:{line}: dataset.path: column 'txt' ({data}:1) fills no field of tests.t.Item: "
        "did you mean the field 'text'? Rename the column, or map it: payload.from_row, "
        "or list it in dataset.ignore_columns to leave it out")


def test_ignored_columns_load_and_the_unfilled_fields_are_listed(make_job):
    rows = [{"id": f"r{i}", "text": f"row {i}", "source": "web"} for i in range(3)]
    path = make_job(AGENTS, ROLES, "f", rows=rows, dataset={"ignore_columns": ["source"]})
    assert load_job(path).unfilled_fields == ["n", "path", "blob"]


def test_with_from_row_a_column_it_does_not_name_is_refused(make_job):
    path = make_job(AGENTS, ROLES, "f", rows=3, payload={"from_row": {"text": "text"}})
    msg = refusal(path)
    assert "column 'n' (" in msg and msg.endswith(
        "payload.from_row is given, so only the columns it names fill the payload; map it there (n: n), "
        "or list it in dataset.ignore_columns to leave it out"), msg


def test_a_later_row_with_an_unknown_column_fails_its_own_task(make_job):
    job = load_job(make_job(AGENTS, ROLES, "f", rows=3))
    factory = TaskFactory(job.spec, payload_class(job), None)
    task = factory.new(150, {"id": "late", "text": "x", "colour": "red"}, 0, "data.jsonl:151")
    assert task.status == task_pb2.TASK_STATUS_FAILED
    assert task.error.message == ("RowError: data.jsonl:151: row id 'late': column(s) ['colour'] fill no payload "
                                  "field; map them with payload.from_row or list them in dataset.ignore_columns")
    ok = factory.new(0, {"id": "r0", "text": "x", "n": 4}, 0, "data.jsonl:1")
    assert ok.status == task_pb2.TASK_STATUS_RUNNING


def test_an_output_dir_that_cannot_be_made_is_refused_at_load(make_job, user_dir, unprivileged_user):
    theirs = Path(tempfile.mkdtemp(prefix="userloop-root-"))  # root's, 0700: the user cannot write there
    try:
        job_dir = user_dir / "cv"
        shutil.copytree(make_job(AGENTS, ROLES, "f", rows=2).parent, job_dir)
        spec = json.loads((job_dir / "job.yaml").read_text())
        spec["run"]["output_dir"] = os.path.relpath(theirs / "runs", job_dir)
        (job_dir / "job.yaml").write_text(json.dumps(spec, indent=2))
        for p in [job_dir, *job_dir.iterdir()]:  # the user's own job folder, whatever our umask
            os.chown(p, unprivileged_user.uid, unprivileged_user.gid)
        done = unprivileged_user.run([sys.executable, "-m", "matrix_hpc.cli", "run",
                                      str(job_dir / "job.yaml"), "--no-progress"], timeout=120)
        line = line_of(job_dir / "job.yaml", '"output_dir"')
        assert done.returncode == 2, done.stderr
        assert done.stderr == (
            f"error: {job_dir / 'job.yaml'}:{line}: run.output_dir: {spec['run']['output_dir']!r} is "
            f"{theirs / 'runs'}, outside the job folder {job_dir}, and cannot be made there ({theirs} is not a "
            "folder this user can write to); give an output_dir inside the job folder (e.g. runs/{job}) "
            "or pass -o RUN_DIR\n")
    finally:
        shutil.rmtree(theirs)


# ---- 2 and 3: the exit status follows the run; failed rows rerun from their dataset rows --------

FLAKY = """
from pathlib import Path
from matrix_hpc import DONE

async def f(item, ctx):
    if item.n == 2 and not (Path(__file__).parent / "fixed").exists():
        raise ValueError("n is 2")
    item.path.append("f")
    return DONE
"""


def export_rows(run_dir: Path, *extra: str) -> list[dict]:
    out = run_dir / "export.jsonl"
    assert main(["export", str(run_dir), "-o", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_failed_rows_rerun_from_their_dataset_rows_into_a_new_run_directory(ray_session, make_job, capsys):
    path = make_job(FLAKY, ROLES, "f", rows=6, run={"retry": {"max_retries": 0, "backoff_s": 0}})
    data = path.parent / "data.jsonl"
    lines = data.read_text().splitlines()
    lines[4] = '{"id": "r4", "text": "row 4", "n": 4'  # malformed: fails its own task as row "4"
    data.write_text("\n".join(lines) + "\n")
    run_dir = path.parent / "out"
    with deadline(180):
        assert main(["run", str(path), "--no-progress"]) == Exit.TASKS_FAILED
        assert main(["resume", str(run_dir)]) == Exit.TASKS_FAILED  # already complete, still failed
    note = "note: payload fields that no dataset column fills (left to the agents): path, blob\n"
    assert capsys.readouterr().err.count(note) == 1  # once, when the run directory was made
    failed = {r["task_id"]: r for r in export_rows(run_dir, "--failed")}
    assert sorted(failed) == ["4#0", "r2#0"] and failed["4#0"]["text"] == ""  # the payload at the failure
    capsys.readouterr()

    lines[4] = '{"id": "r4", "text": "row 4", "n": 4}'  # the line fixed in place, the agent fixed
    data.write_text("\n".join(lines) + "\n")
    (path.parent / "fixed").write_text("")
    new = path.parent / "again"
    with deadline(180):
        assert main(["rerun", str(run_dir), "-o", str(new), "--no-progress"]) == Exit.USAGE
        assert "the dataset changed since" in capsys.readouterr().err
        assert not new.exists()
        assert main(["rerun", str(run_dir), "-o", str(new), "--no-progress", "--force"]) == Exit.OK
        assert main(["resume", str(new)]) == Exit.OK  # already complete
    status = RunStore.open(new).status()
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (2, 2, 0, 0)
    rows = {r["task_id"]: r for r in export_rows(new)}
    assert sorted(rows) == ["r2#0", "r4#0"]  # the fixed line has its id now
    assert [(rows[t]["text"], rows[t]["n"], rows[t]["path"], rows[t]["retries"]) for t in sorted(rows)] == [
        ("row 2", 2, ["f"], 0), ("row 4", 4, ["f"], 0)]  # fresh from the row: one step, no failed try carried
    old = RunStore.open(run_dir).status()
    assert (old["done"], old["failed"]) == (4, 2)  # the original is left as it was; 4 + 2 rerun = 6 rows done
    with deadline(60):
        assert main(["rerun", str(new), "-o", str(path.parent / "third")]) == Exit.OK
    assert "no failed tasks; nothing to rerun" in capsys.readouterr().out


# ---- 4. one throughput --------------------------------------------------------------------------

def test_the_summary_its_event_and_status_give_one_throughput(ray_session, make_job):
    from matrix_hpc import run

    job = load_job(make_job(AGENTS, ROLES, "f", rows=30))
    with deadline(120):
        summary = run(job, progress=False)
    final = RunStore.open(job.run_dir).events()[-1]
    status = RunStore.open(job.run_dir).status()
    assert summary.done == 30 and summary.processing_s > 0
    expected = round(30 / summary.processing_s, 2)
    assert round(summary.throughput, 2) == final["throughput_rows_per_s"] == status["throughput_rows_per_s"] \
        == expected
    assert status["processing_s"] == round(summary.processing_s, 3)


def test_status_sums_the_processing_of_every_session_and_no_time_between(monkeypatch):
    from types import SimpleNamespace as Seg

    from matrix_hpc.store.throughput import processing_seconds

    events = [{"kind": "sending", "run_id": "a", "time": "2026-01-01T00:00:00.000Z"},
              {"kind": "interrupted", "run_id": "a", "time": "2026-01-01T00:00:09.000Z", "processing_s": 8.5},
              {"kind": "sending", "run_id": "b", "time": "2026-01-01T01:00:00.000Z"}]  # b: still running
    b_start = 1767229200 * 10**9  # 2026-01-01T01:00:00Z
    segments = [Seg(writer="a-sink-0", time_ns=b_start - 3590 * 10**9),
                Seg(writer="b-sink-0", time_ns=b_start + 2_250_000_000),
                Seg(writer="b-sink-1", time_ns=b_start + 1_500_000_000)]
    assert processing_seconds(events, segments) == 8.5 + 2.25


def test_the_progress_line_counts_rows_per_second_since_sending_began(monkeypatch):
    import io

    from matrix_hpc.runtime import progress as progress_module

    p = progress_module.Progress(100, 10, stream=io.StringIO())
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: p.t0 + 4.0)
    p.update(done=6, failed=2, in_flight=5)
    assert p.line == "done 16/100  failed 2  in flight 5  2.0 rows/s  ETA 41s"


# ---- 5. a clean terminal --------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["status"], ["export"], ["resume"], ["rerun", "-o", "elsewhere"], ["logs"],
                                  ["cancel"]])
def test_every_command_names_a_missing_run_directory_in_the_same_words(argv, capsys):
    assert main([argv[0], "does/not/exist", *argv[1:]]) == 2
    err = capsys.readouterr().err  # `run`, `resume` and `rerun` say "error: ", as for a bad job file
    prefix = "error: " if argv[0] in ("resume", "rerun") else f"matrix-hpc {argv[0]}: error: "
    assert err == f"{prefix}does/not/exist: no such run directory\n"


def test_status_into_a_closed_pipe_ends_quietly(make_job):
    from matrix_hpc.runtime.driver import open_store

    job = load_job(make_job(AGENTS, ROLES, "f", rows=3))
    open_store(job, force=False)
    read, write = os.pipe()
    os.close(read)  # the reader has left already (`| head` that has what it wanted): every write fails
    try:
        done = subprocess.run([sys.executable, "-m", "matrix_hpc.cli", "status", str(job.run_dir)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, "")


BIG = "from matrix_hpc import DONE\nimport time\nasync def f(item, ctx):\n    time.sleep(0.05)\n    return DONE\n"


@pytest.mark.slow  # its own Ray, started by `matrix-hpc run` in a subprocess
def test_ray_core_worker_lines_go_to_the_log_and_an_interrupt_is_told_once(make_job):
    from test_resume import kill_session

    path = make_job(BIG, ROLES, "f", rows=400, run={"max_in_flight": 8})
    spec = json.loads(path.read_text())
    spec["description"] = "x" * 150_000  # the job is passed to every actor: past Ray's inline limit
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli", "run", str(path), "--no-progress"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run_dir = path.parent / "out"
    try:
        with deadline(150):
            while not (run_dir / "store.zarr").exists() or not RunStore.open(run_dir).committed():
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == Exit.INTERRUPTED, err
    log = (run_dir / "logs" / "run.log").read_text()
    assert "has constructor arguments in the object store" in log
    assert "core_worker.cc" not in err + out and "Traceback" not in err + out, err
    told = [line for line in (err + out).splitlines() if line.startswith("interrupted")]
    assert told == [f"interrupted: committed rows are kept, in-flight tasks saved; continue with: "
                    f"matrix-hpc resume {run_dir}"], err + out


def test_vllm_own_warnings_stay_in_the_log_and_the_rest_still_count():
    from matrix_hpc.runtime.ray_output import worth_a_warning

    engine = ("(LLMReplica pid=812) (EngineCore_DP0 pid=990) WARNING 12-05 17:00:00 [arg_utils.py:3006] This model "
              "does not officially support disabling chunked prefill. Disabling this manually may cause the engine "
              "to crash or produce incorrect outputs.")
    assert not worth_a_warning(engine)
    assert worth_a_warning(engine.replace("WARNING", "ERROR"))  # the engine's errors matter
    assert worth_a_warning("(f[t:1234abcd] pid=77) WARNING agents: row 10 looks odd")
    assert worth_a_warning("Traceback (most recent call last):")
    assert not worth_a_warning("(f pid=77) agent print 10")
    assert not worth_a_warning("(LLMReplica pid=812) WARNING:vllm.triton_utils.importing:Triton is installed, but "
                               "doesn't include CPU backend. Disabling Triton.")  # before vLLM set its format


def test_worker_output_after_the_work_is_the_teardown_and_is_not_counted(tmp_path):
    import io
    import logging

    from matrix_hpc.runtime.progress import Terminal

    out = io.StringIO()
    term = Terminal(enabled=True, stream=out)
    term.capture(tmp_path / "logs")
    progress = term.progress(total=1, already=0)
    term.warnings.add_from_worker("(sink pid=3) WARNING commit slow")
    term.warnings.add_from_worker("(LLMReplica pid=9) ERROR 12-05 17:33:30 [core.py:12] a real engine error")
    progress.close()  # the run's work is over; the engines are being shut down
    term.warnings.add_from_worker("(LLMReplica pid=9) ERROR 12-05 17:33:32 [async_llm.py:906] AsyncLLM "
                                  "output_handler failed.")
    term.warnings.add_from_worker("(f pid=4) WARNING agents: row 39 looks odd")  # an agent's, arriving late
    logging.getLogger("matrix_hpc.runtime.driver").warning("a sandbox did not stop")  # ours still count
    term.close()
    assert out.getvalue() == (f"warnings: 4 (details in {tmp_path / 'logs' / 'run.log'})\n"
                              "  1 x (sink pid=3) WARNING commit slow\n"
                              "  1 x (LLMReplica pid=9) ERROR 12-05 17:33:30 [core.py:12] a real engine error\n"
                              "  1 x (f pid=4) WARNING agents: row 39 looks odd\n"
                              "  ... and 1 other kind(s)\n")
