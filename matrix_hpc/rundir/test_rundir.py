"""The run directory's owner: the run record (and the files of older versions), and one writer at a
time: a live holder refuses a second one by name, a dead one (exited, pid reused, no heartbeat from
another host, Slurm job gone) is taken over, and of several takers of a dead holder exactly one wins.
Real processes and real files; the local Slurm where a Slurm job's state is asked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrix_hpc.rundir import RunDir, RunRecord
from matrix_hpc.rundir.holder import SLURM_JOB, STALE_S, Holder, RunDirHeld

# A process that holds a run directory until its stdin closes; "held" or "refused: <why>" on stdout.
HOLD = """
import sys
from matrix_hpc.rundir import RunDir
from matrix_hpc.rundir.holder import RunDirHeld
sys.stdin.readline()  # "go"
try:
    lease = RunDir(sys.argv[1]).hold(sys.argv[2])
except RunDirHeld as e:
    print("refused:", e, flush=True)
    sys.exit(2)
print("held", flush=True)
sys.stdin.read()
lease.release()
"""


def holder_process(run_dir: Path, command: str = "run", user=None) -> subprocess.Popen:
    argv = [sys.executable, "-c", HOLD, str(run_dir), command]
    if user is not None:
        argv = user.command(argv)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})


def go(proc: subprocess.Popen) -> str:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def write_holder(run_dir: Path, age_s: float = 0.0, **fields) -> Holder:
    holder = Holder(**{"token": "t0", "command": "run", "host": socket.gethostname(), "pid": 1,
                       "since": time.time() - age_s, **fields})
    path = RunDir(run_dir).holder_file
    path.write_text(json.dumps(holder.__dict__))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return holder


def test_the_run_record_is_written_whole_and_read_through_one_api(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.record() == RunRecord()
    rd.update_record(job="/jobs/x/job.yaml", force=True, options={"max_requeues": 3})
    rd.record_slurm_job("41")
    assert rd.record() == RunRecord(job="/jobs/x/job.yaml", force=True, options={"max_requeues": 3},
                                    slurm_job_id="41")
    assert sorted(p.name for p in rd.root.iterdir()) == ["run.json"]  # no temporary file left
    assert (rd.store, rd.run_log, rd.events, rd.node_log("41", 1, "err"), rd.ray_attempt("41", 2)) == (
        rd.root / "store.zarr", rd.root / "logs" / "run.log", rd.root / "logs" / "events.jsonl",
        rd.root / "slurm" / "41_1_log.err", rd.root / "slurm" / "ray" / "41.2")


def test_a_run_directory_of_an_older_version_is_read_from_its_files(tmp_path):
    (tmp_path / "slurm").mkdir(parents=True)
    (tmp_path / "job_path.txt").write_text("/jobs/x/job.yaml\n")
    (tmp_path / "slurm" / "job_id").write_text("17\n")
    (tmp_path / "slurm" / "options.json").write_text(json.dumps({"max_requeues": 4}))
    (tmp_path / "slurm" / "submit.json").write_text(json.dumps({"job": "/jobs/x/job.yaml", "slurm": {"nodes": 2},
                                                                "options": {"max_requeues": 4}}))
    assert RunDir(tmp_path).record() == RunRecord(job="/jobs/x/job.yaml", slurm={"nodes": 2},
                                                  options={"max_requeues": 4}, slurm_job_id="17")


def test_a_live_holder_is_named_and_one_that_exited_is_taken_over(tmp_path, unprivileged_user, user_dir):
    run_dir = user_dir / "run"
    run_dir.mkdir()
    os.chown(run_dir, unprivileged_user.uid, unprivileged_user.gid)
    first = holder_process(run_dir, "run", unprivileged_user)
    assert go(first) == "held"
    holder = RunDir(run_dir).holder()
    second = holder_process(run_dir, "resume", unprivileged_user)
    refused = go(second)
    assert second.wait(30) == 2
    assert refused == (f"refused: {run_dir} is in use by matrix-hpc run (pid {holder.pid} on {socket.gethostname()}"
                       f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.since))}) (running): one "
                       f"run writes to a run directory at a time; wait for it to end or stop it first (Ctrl-C, or "
                       f"kill {holder.pid} on {socket.gethostname()})")
    os.kill(holder.pid, signal.SIGKILL)  # the holding Python itself (under runuser): no release, the record stays
    first.wait(30)
    assert RunDir(run_dir).holder() == holder
    third = holder_process(run_dir, "resume", unprivileged_user)
    assert go(third) == "held"
    assert RunDir(run_dir).holder().command == "resume"
    third.stdin.close()  # releases
    assert third.wait(30) == 0
    assert RunDir(run_dir).holder() is None


def test_a_reused_pid_is_not_the_holder(tmp_path):
    write_holder(tmp_path, pid=os.getpid(), pid_start="1")  # this process is alive, but started at another time
    with RunDir(tmp_path).hold("run") as lease:
        assert RunDir(tmp_path).holder() == lease.holder


def test_a_holder_on_another_host_lives_by_its_heartbeat(tmp_path):
    write_holder(tmp_path, host="node-elsewhere", pid=4242, age_s=STALE_S / 2)
    with pytest.raises(RunDirHeld, match=r"in use by matrix-hpc run \(pid 4242 on node-elsewhere, .*last heartbeat"):
        RunDir(tmp_path).hold("run")
    write_holder(tmp_path, host="node-elsewhere", pid=4242, age_s=STALE_S + 5)
    with RunDir(tmp_path).hold("run") as lease:
        assert RunDir(tmp_path).holder().token == lease.holder.token
    assert RunDir(tmp_path).holder() is None


def test_a_nested_hold_of_one_process_is_the_same_hold(tmp_path):
    rd = RunDir(tmp_path)
    with rd.hold("run") as outer:
        with rd.hold("run") as inner:
            assert inner is outer
        assert rd.holder() == outer.holder  # the inner release keeps it
    assert rd.holder() is None


def test_of_several_takers_of_a_dead_holder_exactly_one_wins(tmp_path):
    write_holder(tmp_path, host="node-elsewhere", age_s=STALE_S + 5)
    takers = [holder_process(tmp_path) for _ in range(4)]
    for t in takers:
        t.stdin.write("go\n")
        t.stdin.flush()
    answers = [t.stdout.readline().strip() for t in takers]
    assert sorted(a.split(":")[0] for a in answers) == ["held", "refused", "refused", "refused"], answers
    winner = takers[answers.index("held")]
    assert all(f"(pid {RunDir(tmp_path).holder().pid} on" in a for a in answers if a != "held")
    for t in takers:
        t.stdin.close()
        t.wait(30)
    assert winner.returncode == 0 and RunDir(tmp_path).holder() is None


def test_a_slurm_holder_lives_while_slurm_has_its_job(tmp_path, monkeypatch):
    write_holder(tmp_path, command=SLURM_JOB, slurm_job_id="999999999", host="node-elsewhere")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # Slurm cannot be asked: never taken away
    with pytest.raises(RunDirHeld, match=r"already state unknown: Slurm does not answer as Slurm job 999999999"):
        RunDir(tmp_path).hold("run")
    monkeypatch.undo()
    conf = os.environ.get("SLURM_CONF", "")
    if not shutil.which("squeue") or not Path(conf).exists():
        pytest.skip("no local Slurm (slurm/local-slurm-up.sh) to ask about a job that is gone")
    with RunDir(tmp_path).hold("run") as lease:  # the job is not in Slurm's queue: taken over
        assert RunDir(tmp_path).holder().token == lease.holder.token
