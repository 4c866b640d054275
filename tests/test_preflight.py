"""`run` and `resume` check the run directory before Ray starts: a changed dataset is refused,
a finished run says so. RAY_ADDRESS points at a port nobody listens on, so reaching Ray at
all would fail (or hang until the deadline) instead of passing."""

from __future__ import annotations

import pytest
from conftest import deadline

from matrix_hpc import load_job
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.cli import main
from matrix_hpc.rundir import RunDir
from matrix_hpc.runtime.driver import open_store

AGENTS = "from matrix_hpc import DONE\nasync def f(item, ctx):\n    return DONE\n"
ROLES = {"f": {"agent": "agents:f"}}


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")


def test_resume_after_editing_a_middle_row_is_refused_before_ray(make_job, no_ray, capsys):
    path = make_job(AGENTS, ROLES, "f", rows=200)
    job = load_job(path)
    store, _ = open_store(job, force=False)  # the run as `run` creates it, with one row committed
    writer = store.writer("w0")  # (a run of which nothing was committed or saved is simply started afresh)
    writer.append("r0#0", 0, task_pb2.TASK_STATUS_DONE, task_pb2.Task(task_id="r0#0").SerializeToString())
    writer.flush()
    data = path.parent / "data.jsonl"
    data.write_text(data.read_text().replace('"row 100"', '"row 1OO"'))  # same size
    with deadline(30):
        assert main(["resume", str(job.run_dir), "--job", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {job.run_dir} was made by a different job: changed since: dataset. "
                   "Use another output directory, or --force to resume anyway.\n")


def test_a_finished_run_says_it_is_complete_before_ray_with_the_status_its_failures_deserve(make_job, no_ray, capsys):
    path = make_job(AGENTS, ROLES, "f", rows=3)
    job = load_job(path)
    store, _ = open_store(job, force=False)
    writer = store.writer("w0")
    for i, status in enumerate([task_pb2.TASK_STATUS_DONE, task_pb2.TASK_STATUS_FAILED, task_pb2.TASK_STATUS_DONE]):
        writer.append(f"r{i}#0", i, status, task_pb2.Task(task_id=f"r{i}#0").SerializeToString())
    writer.flush()
    RunDir(job.run_dir).update_record(job=str(path))  # as the run records it
    expected = (f"{job.run_dir}: this run is already complete: 2 done, 1 failed of 3 tasks; nothing to run.\n"
                f"more failed tasks than run.max_failed_fraction (0) allows; failed rows: matrix-hpc export "
                f"{job.run_dir} --failed; run them again from their dataset rows: matrix-hpc rerun {job.run_dir} "
                f"-o NEW_RUN_DIR\nexport: matrix-hpc export {job.run_dir} --format jsonl\nexit status: 3\n")
    with deadline(30):  # whichever command, however often: a script's `resume || alert` sees the failure
        for argv in (["run", str(path)], ["resume", str(job.run_dir)], ["resume", str(job.run_dir)],
                     ["run", str(path)]):
            assert main(argv) == 3, argv
            assert capsys.readouterr().out == expected
    spec = path.read_text().replace('"output_dir": "out"', '"output_dir": "out", "max_failed_fraction": 0.34')
    path.write_text(spec)  # within the fraction: 1 of 3
    with deadline(30):
        assert main(["run", str(path), "--force"]) == 0
    assert capsys.readouterr().out.endswith("--format jsonl\nexit status: 0\n")


def test_a_fresh_run_dir_gets_the_dataset_digest_so_resume_reads_nothing(make_job, no_ray):
    from matrix_hpc.job.dataset_checks import DIGEST_CACHE
    from matrix_hpc.runtime.preflight import preflight

    job = load_job(make_job(AGENTS, ROLES, "f", rows=3))
    assert not job.run_dir.exists()
    assert preflight(job, force=False) is None
    assert (job.run_dir / DIGEST_CACHE).read_text().count(job.fingerprint["dataset"]) == 1
