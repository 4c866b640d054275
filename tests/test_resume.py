"""Resume: kill -9 of the whole run at random moments, Ctrl-C, SIGUSR2 snapshots, a killed sink,
and refusing to resume a run of a changed job. Real processes, real kills."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import deadline
from test_runtime import results

from matrix_hpc import load_job, run
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.runtime.driver import ResumeRefused
from matrix_hpc.services.core.endpoint import ReplicaRef
from matrix_hpc.services.sandbox.deploy import SandboxEndpoint
from matrix_hpc.store import RunStore

STEPS = 6
# Each step appends one line "task step" to calls.log (O_APPEND): the counting service.
COUNTING = f"""
import asyncio, os
from matrix_hpc import DONE

STEPS = {STEPS}

def _count(ctx):
    fd = os.open(os.path.join(os.path.dirname(__file__), "calls.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{{ctx.task_id}} {{ctx.step}}\\n".encode())
    os.close(fd)

async def ping(item, ctx):
    await asyncio.sleep(0.15 + ctx.random.random() * 0.15)
    _count(ctx)
    item.path.append(f"ping{{ctx.step}}")
    return "pong"

async def pong(item, ctx):
    await asyncio.sleep(0.15 + ctx.random.random() * 0.15)
    _count(ctx)
    item.path.append(f"pong{{ctx.step}}")
    return DONE if ctx.step + 1 >= STEPS else "ping"
"""
ROLES = {"ping": {"agent": "agents:ping", "concurrency": 500}, "pong": {"agent": "agents:pong", "concurrency": 500}}


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def resume_ok(run_dir: Path, timeout: float = 180) -> dict:
    """`matrix-hpc resume RUN_DIR` must succeed; return its JSON summary."""
    resumed = cli("resume", str(run_dir), "--no-progress", "--json")
    out, _ = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def kill_session(sid: int) -> None:
    """SIGKILL every process of the run's session: the driver, Ray's daemons and its workers
    (which Ray puts in process groups of their own), as a node failure or scancel would."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
            if int(rest.rsplit(")", 1)[1].split()[3]) == sid:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def wait_for_snapshot(run_dir: Path, proc: subprocess.Popen, timeout: float = 90, committed: int = 0) -> None:
    """Block until the run has written a snapshot holding a task part-way through, and committed
    at least ``committed`` rows (polling the store)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            snap = RunStore.open(run_dir).latest_snapshot()
        except Exception:  # noqa: BLE001 - the store is not created yet
            snap = None
        if snap and any(task_pb2.Task.FromString(t).step > 0 for t in snap[0]):
            if len(RunStore.open(run_dir).committed()) >= committed:
                return
        time.sleep(0.1)
    raise TimeoutError("no snapshot was written")


def calls(job_dir: Path) -> Counter:
    return Counter(tuple(line.split()) for line in (job_dir / "calls.log").read_text().splitlines())


def check_complete(job, rows: int) -> None:
    got = results(job)
    assert Counter(t.task_id for t, _ in got) == Counter({f"r{i}#0": 1 for i in range(rows)})
    for t, p in got:
        assert t.status == task_pb2.TASK_STATUS_DONE and t.step == STEPS
        assert list(p.path) == [f"{'ping' if s % 2 == 0 else 'pong'}{s}" for s in range(STEPS)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_of_the_whole_run_then_resume(make_job, seed):
    rows = 200
    path = make_job(COUNTING, ROLES, "ping", rows=rows, run={"max_in_flight": 60, "checkpoint_interval_s": 0.3})
    job = load_job(path)
    proc = cli("run", str(path), "--no-progress")
    wait_for_snapshot(job.run_dir, proc)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))  # a random moment, not a synchronization
    kill_session(proc.pid)
    proc.wait()

    store = RunStore.open(job.run_dir)
    committed = store.committed()
    snapshot = {t.task_id: t.step for t in map(task_pb2.Task.FromString, store.latest_snapshot()[0])}
    before = calls(path.parent)
    assert len(committed) < rows, "the run finished before it was killed; nothing to resume"

    summary = resume_ok(job.run_dir)
    check_complete(job, rows)
    assert summary["done"] == rows - len(committed)
    status = RunStore.open(job.run_dir).status()
    assert summary["done_total"] == status["done"] == rows
    assert summary["exit_status"] == 0
    # steps: the resumed run's are those of the tasks it committed, each of STEPS alternating steps
    half = STEPS // 2
    assert summary["steps"] == {"ping": half * summary["done"], "pong": half * summary["done"]}
    assert status["steps_by_role"] == {"ping": half * rows, "pong": half * rows}

    after = calls(path.parent)
    # Committed rows were not run again.
    for tid in committed:
        assert after[(tid, str(STEPS - 1))] == before[(tid, str(STEPS - 1))]
    # Tasks restored from the snapshot continued from their saved step: earlier steps ran once.
    resumed_mid_way = [tid for tid, step in snapshot.items() if tid not in committed and step > 0]
    assert resumed_mid_way, "no task was in the middle of its steps at the snapshot"
    for tid in resumed_mid_way:
        for s in range(snapshot[tid]):
            assert after[(tid, str(s))] == 1, (tid, s, snapshot[tid])


def test_kill_9_of_the_driver_alone_then_resume(make_job):
    """The driver dies and the resumed run starts at once, while the killed run's processes may still
    be stopping (test_fate.py checks they do, and commit nothing): every row exactly once."""
    rows = 200
    path = make_job(COUNTING, ROLES, "ping", rows=rows, run={"max_in_flight": 60, "checkpoint_interval_s": 0.3})
    job = load_job(path)
    proc = cli("run", str(path), "--no-progress")
    wait_for_snapshot(job.run_dir, proc, committed=1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        resume_ok(job.run_dir)
        check_complete(job, rows)
    finally:
        kill_session(proc.pid)  # whatever of the killed run is left if the test failed


def test_a_torn_last_commit_is_redone_on_resume(make_job):
    rows = 60
    path = make_job(COUNTING.replace("STEPS = 6", "STEPS = 1"), ROLES, "ping", rows=rows,
                    run={"commit_interval_s": 0.2, "max_in_flight": 8})
    job = load_job(path)
    done = cli("run", str(path), "--no-progress")
    assert done.wait(timeout=120) == 0, done.stdout.read()
    records = sorted((job.run_dir / "store.zarr" / "writers").glob("*/commits/c.*"),
                     key=lambda p: int(p.name.split(".")[1]))
    assert len(records) > 1
    torn = records[-1]
    torn.write_bytes(torn.read_bytes()[: len(torn.read_bytes()) // 2])  # the last write, cut off
    kept = len(RunStore.open(job.run_dir).committed())
    assert kept < rows

    assert resume_ok(job.run_dir, timeout=120)["done"] == rows - kept
    got = Counter(task_pb2.Task.FromString(d).task_id for d in RunStore.open(job.run_dir).iter_results())
    assert got == Counter({f"r{i}#0": 1 for i in range(rows)})


def test_ctrl_c_keeps_results_and_resume_finishes(make_job):
    rows = 120
    path = make_job(COUNTING, ROLES, "ping", rows=rows, run={"max_in_flight": 40, "checkpoint_interval_s": 0.5})
    job = load_job(path)
    proc = cli("run", str(path), "--no-progress")
    wait_for_snapshot(job.run_dir, proc, committed=1)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert f"matrix-hpc resume {job.run_dir}" in out
    kept = len(RunStore.open(job.run_dir).committed())
    assert 0 < kept < rows

    summary = resume_ok(job.run_dir)
    check_complete(job, rows)
    # what each run says it did adds up to what the store holds, in the events too
    ends = [e for e in RunStore.open(job.run_dir).events() if e["kind"] in ("interrupted", "finished")]
    assert [e["kind"] for e in ends] == ["interrupted", "finished"]
    assert [e["done"] for e in ends] == [kept, rows - kept] and ends[1]["steps"] == summary["steps"]
    assert {role: ends[0]["steps"][role] + ends[1]["steps"][role] for role in ROLES} == \
        RunStore.open(job.run_dir).status()["steps_by_role"] == {"ping": STEPS // 2 * rows, "pong": STEPS // 2 * rows}


def test_sigusr2_takes_a_snapshot(ray_session, make_job):
    path = make_job(COUNTING, ROLES, "ping", rows=80, run={"max_in_flight": 40, "checkpoint_interval_s": 3600})
    job = load_job(path)

    def signal_when_busy(r):
        def go():
            while ray_session.get(r.source.stats.remote())["in_flight"] < 20:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGUSR2)
        threading.Thread(target=go, daemon=True).start()

    with deadline(120):
        summary = run(job, progress=False, on_start=signal_when_busy)
    assert summary.done == 80 and summary.checkpoints == 1
    tasks, meta = RunStore.open(job.run_dir).latest_snapshot()
    assert len(tasks) == meta["in_flight"] > 0
    assert len({task_pb2.Task.FromString(t).task_id for t in tasks}) == len(tasks)
    checkpoints = [e for e in RunStore.open(job.run_dir).events() if e["kind"] == "checkpoint"]
    assert len(checkpoints) == 1
    assert checkpoints[0]["tasks"] == len(tasks) and checkpoints[0]["bytes"] == sum(map(len, tasks))
    assert 0 < checkpoints[0]["seconds"] < 30


def test_a_killed_sink_loses_nothing_and_writes_nothing_twice(ray_session, make_job):
    rows = 300
    path = make_job(COUNTING.replace("STEPS = 6", "STEPS = 2"), ROLES, "ping", rows=rows,
                    run={"max_in_flight": 100, "sinks": 2, "commit_interval_s": 0.5})
    job = load_job(path)
    killed = []

    def kill_sink(r):
        def go():
            victim = r.sinks[0]
            while ray_session.get(victim.stats.remote())["done"] < 20:
                time.sleep(0.01)
            ray_session.kill(victim, no_restart=False)
            killed.append(True)
        threading.Thread(target=go, daemon=True).start()

    with deadline(180):
        summary = run(job, progress=False, on_start=kill_sink)
    assert killed
    got = results(job)
    assert Counter(t.task_id for t, _ in got) == Counter({f"r{i}#0": 1 for i in range(rows)})
    # the restarted sink's counters began at zero; the summary counts in the store
    status = RunStore.open(job.run_dir).status()
    assert summary.done == summary.done_total == status["done"] == rows
    assert summary.steps == status["steps_by_role"] == {"ping": rows, "pong": rows}
    assert summary.actor_restarts == 1
    finished = [e for e in RunStore.open(job.run_dir).events() if e["kind"] == "finished"]
    assert [(e["done"], e["actor_restarts"]) for e in finished] == [(rows, 1)]


class HungService:
    """A service that accepts connections and never answers, until ``close()`` (then it is gone)."""

    def __init__(self, path: Path):
        self.path, self.accepted = path, []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.server.accept()[0])
            except OSError:  # closed
                return

    def close(self) -> None:
        if self.server.fileno() < 0:
            return
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for conn in self.accepted:
            conn.close()
        self.path.unlink()


def test_a_sink_killed_between_its_commit_and_telling_the_source(ray_session, make_job, tmp_path):
    """A sink commits, releases the tasks' sandbox sessions, then tells the source. Killed in between
    (here while the sandbox service hangs), its rows are committed yet still in flight at the source:
    the recovery must free their places, or the run never ends."""
    rows = 60
    path = make_job(COUNTING.replace("STEPS = 6", "STEPS = 2"), ROLES, "ping", rows=rows,
                    run={"max_in_flight": 40, "sinks": 2, "commit_interval_s": 0.3},
                    services={"sandbox": {"box": {}}})
    job = load_job(path)
    hung = HungService(tmp_path / "hung.sock")
    box = SandboxEndpoint(name="box", replicas=[ReplicaRef(f"unix:{hung.path}")])
    committed_at_kill = []

    def kill_sink_while_it_releases(r):
        def go():
            victim = r.sinks[0]
            while (done := ray_session.get(victim.stats.remote())["done"]) == 0:
                time.sleep(0.01)
            ray_session.kill(victim, no_restart=False)
            committed_at_kill.append(done)
            hung.close()  # from now on a release fails at once (and is only warned about)
        threading.Thread(target=go, daemon=True).start()

    try:
        with deadline(120):
            summary = run(job, progress=False, on_start=kill_sink_while_it_releases,
                          services={"sandbox": {"box": box}})
    finally:
        hung.close()
    got = results(job)
    assert Counter(t.task_id for t, _ in got) == Counter({f"r{i}#0": 1 for i in range(rows)})
    assert summary.done == rows and summary.actor_restarts == 1
    events = RunStore.open(job.run_dir).events()
    assert [e["tasks"] for e in events if e["kind"] == "committed_unreported"] == committed_at_kill


def test_resume_of_a_changed_job_is_refused_unless_forced(ray_session, make_job):
    path = make_job(COUNTING.replace("STEPS = 6", "STEPS = 1"), ROLES, "ping", rows=5)
    job = load_job(path)
    with deadline(60):
        assert run(job, progress=False).done == 5
    path.write_text(path.read_text().replace('"name": "t"', '"name": "t", "description": "changed"'))
    (path.parent / "agents.py").write_text((path.parent / "agents.py").read_text() + "\n# edited\n")
    with pytest.raises(ResumeRefused, match="changed since: (job_spec, agent_code|agent_code, job_spec)"):
        run(load_job(path), progress=False)
    with deadline(60):
        summary = run(load_job(path), progress=False, force=True)
    assert summary.done == 0 and summary.total == 5


# Each step appends "task step" to starts.log as it begins, then to calls.log as it ends.
STARTS = COUNTING.replace("async def ping(item, ctx):\n", "async def ping(item, ctx):\n    _start(ctx)\n").replace(
    "async def pong(item, ctx):\n", "async def pong(item, ctx):\n    _start(ctx)\n").replace("def _count(ctx):", '''def _start(ctx):
    fd = os.open(os.path.join(os.path.dirname(__file__), "starts.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{ctx.task_id} {ctx.step}\\n".encode())
    os.close(fd)

def _count(ctx):''')


def test_the_checkpoint_of_a_stop_is_a_barrier_and_resume_redoes_only_the_running_steps(ray_session, make_job):
    """A stop (SIGTERM, USR2 on Slurm, Ctrl-C) freezes the actors at its checkpoint: no step starts
    after it, so a resume redoes exactly the steps that were running then, each once."""
    rows = 80
    path = make_job(STARTS, ROLES, "ping", rows=rows, run={"max_in_flight": 40, "checkpoint_interval_s": 3600})
    job = load_job(path)
    starts_log = path.parent / "starts.log"
    stop = threading.Event()

    def stop_when_busy(_runner):
        def go():
            while not starts_log.exists() or len(starts_log.read_text().splitlines()) < 100:
                time.sleep(0.01)
            stop.set()
        threading.Thread(target=go, daemon=True).start()

    with deadline(120):
        first = run(job, progress=False, on_start=stop_when_busy, stop_requested=stop)
    assert first.interrupted
    tasks, _ = RunStore.open(job.run_dir).latest_snapshot()
    saved = {t.task_id: t.step for t in map(task_pb2.Task.FromString, tasks)}
    committed = set(RunStore.open(job.run_dir).committed())
    started = [tuple(line.split()) for line in starts_log.read_text().splitlines()]
    last_started: dict[str, int] = {}
    for tid, step in started:
        last_started[tid] = max(last_started.get(tid, -1), int(step))
    # No step started after the checkpoint: every task got no further than its saved step.
    assert all(last_started[tid] <= saved[tid] for tid in last_started if tid not in committed), \
        {tid: (last_started[tid], saved[tid]) for tid in last_started if tid not in committed}
    running = {(tid, str(saved[tid])) for tid in saved if tid not in committed and last_started.get(tid) == saved[tid]}
    assert running, "no step was running at the checkpoint"

    with deadline(120):
        assert run(load_job(path), progress=False).done == rows - len(committed)
    check_complete(job, rows)
    again = {key for key, n in Counter(tuple(line.split()) for line in starts_log.read_text().splitlines()).items()
             if n > 1}
    assert again == running  # redone: exactly the steps running at the checkpoint, each once
    assert max(Counter(tuple(line.split()) for line in starts_log.read_text().splitlines()).values()) == 2
