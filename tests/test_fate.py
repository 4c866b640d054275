"""No ghosts: kill -9 of a run's driver (alone, or with its process group), as root and as an ordinary
user, stops every process of the run within 10 s, no row is committed after the kill, the run's
temporary folder goes, and `resume` then finishes with every row exactly once. The next start in a
run directory clears what an earlier start killed with its watchdog left, and only that."""

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
from test_resume import COUNTING, ROLES, check_complete, cli, resume_ok

from matrix_hpc import fate, load_job
from matrix_hpc.runtime.security import LocalRay
from matrix_hpc.store import RunStore

ROWS = 400
STOP_WITHIN_S = 10


def committed(run_dir: Path) -> int:
    return len(RunStore.open(run_dir).committed())


def wait_for_commits(run_dir: Path, proc: subprocess.Popen, timeout: float = 180) -> dict:
    """Block until the run has committed a row; return its local Ray's record (owner mark, temp folder)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            if committed(run_dir) > 0:
                return json.loads((run_dir / "local-ray.json").read_text())
        except Exception:  # noqa: BLE001 - the store is not created yet
            pass
        time.sleep(0.1)
    raise TimeoutError("the run committed nothing")


def processes_of(owner: str) -> list[str]:
    """Every process that carries the run's mark in its environment (its Ray, actors, their
    children) or on its command line (its watchdog), whoever owns it."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if f"{fate.OWNER_VAR}={owner}".encode() in environ.split(b"\0") or owner.encode() in cmdline.split(b"\0"):
            command = cmdline.replace(b"\0", b" ")[:100].decode(errors="replace")
            found.append(f"{entry.name} {command}")
    return found


def wait_until_gone(owner: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not processes_of(owner):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of the run still alive {seconds}s after the kill: {processes_of(owner)}")


def _job_for(user, make_job, user_dir: Path) -> Path:
    path = make_job(COUNTING, ROLES, "ping", rows=ROWS, run={"max_in_flight": 60, "checkpoint_interval_s": 0.3})
    if user is None:
        return path
    job_dir = user_dir / "job"
    shutil.copytree(path.parent, job_dir)
    for p in [job_dir, *job_dir.rglob("*")]:
        os.chown(p, user.uid, user.gid)
    return job_dir / "job.yaml"


def _start(user, job: Path) -> subprocess.Popen:
    if user is None:
        return cli("run", str(job), "--no-progress")
    return subprocess.Popen(user.command([sys.executable, "-m", "matrix_hpc.cli", "run", str(job), "--no-progress"],
                                         env={"PYTHONUNBUFFERED": "1"}),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _resume(user, run_dir: Path) -> dict:
    if user is None:
        return resume_ok(run_dir)
    done = user.run([sys.executable, "-m", "matrix_hpc.cli", "resume", str(run_dir), "--no-progress", "--json"],
                    timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
# Each kill once, each user once (the four combinations cost the suite two more minutes of Ray runs).
@pytest.mark.parametrize(("what", "as_user"), [("driver", True), ("process-group", False)],
                         ids=["driver-unprivileged", "process-group-root-or-self"])
def test_kill_9_of_the_driver_stops_its_whole_run(make_job, user_dir, unprivileged_user, as_user, what):
    user = unprivileged_user if as_user else None
    job_path = _job_for(user, make_job, user_dir)
    job = load_job(job_path)
    proc = _start(user, job_path)
    try:
        record = wait_for_commits(job.run_dir, proc)
        owner, temp_dir = record["owner"], Path(record["temp_dir"])
        driver = int(owner.split("-")[0])
        assert len(processes_of(owner)) >= 6, processes_of(owner)  # GCS, raylet, source, sink, ping, pong, ...
        if what == "driver":
            os.kill(driver, signal.SIGKILL)
        else:
            os.killpg(os.getpgid(driver), signal.SIGKILL)
        proc.wait(timeout=30)
        after_kill = committed(job.run_dir)
        wait_until_gone(owner, STOP_WITHIN_S)
        assert committed(job.run_dir) == after_kill, "a row was committed after the driver was killed"
        assert after_kill < ROWS, "the run finished before it was killed"
        assert not temp_dir.exists(), f"{temp_dir} was left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    summary = _resume(user, job.run_dir)
    assert summary["exit_status"] == 0
    assert summary["done"] == ROWS - after_kill
    check_complete(job, ROWS)
    assert not (job.run_dir / "local-ray.json").exists()


# -- the next start clears what a start killed with its watchdog left ---------------------------------

def _marked_sleeper(owner: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            env={**os.environ, fate.OWNER_VAR: owner}, start_new_session=True)


def _exited_owner() -> str:
    gone = subprocess.Popen(["true"])
    owner = fate.mark(gone.pid)
    gone.wait()
    return owner


def test_the_next_start_clears_its_runs_leftovers_and_nothing_else(tmp_path):
    owner, other = _exited_owner(), _exited_owner()
    temp_dir = Path(tempfile.mkdtemp(prefix="mhpc-ray-"))
    (temp_dir / "r").mkdir()
    ghost, bystander = _marked_sleeper(owner), _marked_sleeper(other)
    try:
        (tmp_path / "local-ray.json").write_text(json.dumps({"owner": owner, "temp_dir": str(temp_dir)}))
        LocalRay(tmp_path)._clear_leftovers()
        assert ghost.wait(timeout=STOP_WITHIN_S) == -signal.SIGKILL
        assert not temp_dir.exists()
        assert not (tmp_path / "local-ray.json").exists()
        assert bystander.poll() is None, "a process of another run was stopped"
    finally:
        for p in (ghost, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_leftovers_of_a_start_whose_driver_still_runs_are_left_alone(tmp_path):
    owner = fate.mark()  # this process: still running
    temp_dir = Path(tempfile.mkdtemp(prefix="mhpc-ray-"))
    live = _marked_sleeper(owner)
    try:
        (tmp_path / "local-ray.json").write_text(json.dumps({"owner": owner, "temp_dir": str(temp_dir)}))
        LocalRay(tmp_path)._clear_leftovers()
        assert live.poll() is None and temp_dir.exists()
    finally:
        live.kill()
        live.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_owner_gone_tells_a_running_driver_from_an_exited_or_reused_pid():
    assert not fate.owner_has_exited(fate.mark())
    assert fate.owner_has_exited(_exited_owner())
    pid, ticks, token = fate.mark().split("-")
    assert fate.owner_has_exited(f"{pid}-{int(ticks) + 1}-{token}")  # same pid, another process


def test_owner_gone_without_pidfds_uses_proc(monkeypatch):
    def no_pidfd(pid, flags=0):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert not fate.owner_has_exited(fate.mark())
    assert fate.owner_has_exited(_exited_owner())
    zombie = subprocess.Popen(["true"])
    owner = fate.mark(zombie.pid)
    end = time.monotonic() + STOP_WITHIN_S
    while not fate.owner_has_exited(owner) and time.monotonic() < end:  # `true` exits; nobody waits yet
        time.sleep(0.01)
    assert fate.owner_has_exited(owner), "a zombie (exited, not yet waited for) counts as gone"
    zombie.wait()
