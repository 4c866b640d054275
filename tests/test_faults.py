"""Faults that used to hang a run or lose work: a disk that fills up, a send that fails, a dead
source, SIGTERM, a synchronous step past its timeout; and the numbers a run reports (summary,
events, exit status) checked against the store. Real Ray, real disks, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray
from conftest import deadline
from test_resume import cli, kill_session, resume_ok, wait_for_snapshot
from test_runtime import results

from matrix_hpc import load_job, run
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.runtime import router as router_mod
from matrix_hpc.runtime.message import Task, undeliverable
from matrix_hpc.runtime.router import Router
from matrix_hpc.runtime.summary import Exit
from matrix_hpc.store import RunStore, export

QUICK = """
import asyncio
from matrix_hpc import DONE

async def work(item, ctx):
    await asyncio.sleep(0.02)
    item.path.append("work")
    return DONE
"""


def every_row_once(job, rows: int) -> None:
    got = results(job)
    assert Counter(t.task_id for t, _ in got) == Counter({f"r{i}#0": 1 for i in range(rows)})
    assert all(t.status == task_pb2.TASK_STATUS_DONE for t, _ in got)


def session_processes(sid: int) -> list[str]:
    """Command lines of the live (not zombie) processes of session ``sid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return out


# -- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 4 MiB tmpfs (root only: mount), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


BIG_ROWS = """
import os
from matrix_hpc import DONE

def fill(item, ctx):
    item.blob = os.urandom(64 * 1024)  # incompressible: 64 KiB on disk per row
    return DONE
"""


@pytest.mark.slow
def test_a_full_disk_stops_the_run_cleanly_and_resume_finishes(make_job, small_tmpfs):
    rows = 120  # 7.5 MiB of results for a 4 MiB filesystem
    path = make_job(BIG_ROWS, {"fill": {"agent": "agents:fill"}}, "fill", rows=rows,
                    run={"max_in_flight": 16, "checkpoint_interval_s": 1.0})
    run_dir = small_tmpfs / "run"
    proc = cli("run", str(path), "-o", str(run_dir), "--no-progress", "--json")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == Exit.STOPPED, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert "No space left on device" in summary["stopped_by"]
    assert f"free on the filesystem of {run_dir}" in summary["stopped_by"]
    assert f"matrix-hpc resume {run_dir}" in out
    assert "lost with a dead actor" not in out  # no actor died: nothing was taken for lost
    store = RunStore.open(run_dir)
    kept = store.committed()
    assert 0 < len(kept) < rows
    assert summary["done"] == summary["done_total"] == len(kept)
    kinds = [e["kind"] for e in store.events()]
    assert "commit_failed" in kinds and kinds[-1] == "stopped"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)  # space freed
    resumed = resume_ok(run_dir)
    assert resumed["done"] == rows - len(kept) and resumed["done_total"] == rows
    got = Counter(task_pb2.Task.FromString(d).task_id for d in RunStore.open(run_dir).iter_results())
    assert got == Counter({f"r{i}#0": 1 for i in range(rows)})
    assert RunStore.open(run_dir).status()["duplicates"] == 0


# -- a send that fails without a death ----------------------------------------------------------

class Receiver:
    """A real actor whose ``deliver`` raises (a non-death error, as a full object store gives)
    the first ``failures`` times; it keeps what it received."""

    def __init__(self, failures: int):
        self.failures = failures
        self.got: list[bytes] = []

    def deliver(self, items: list) -> int:
        if self.failures:
            self.failures -= 1
            raise MemoryError("object store full (raised by the test's receiver)")
        self.got.extend(items)
        return 0

    def received(self) -> list[bytes]:
        return self.got


# Ray's workers cannot import this test module: ship the class itself.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _messages(n: int, role: str) -> list[bytes]:
    return [Task(task_id=f"r{i}#0", next_role=role).SerializeToString() for i in range(n)]


def test_a_send_failing_without_a_death_is_retried_and_never_hangs_a_pause(ray_session, monkeypatch):
    monkeypatch.setattr(router_mod, "_SEND_BACKOFF_S", 0.05)
    name = f"flaky-{os.getpid()}"
    receiver = ray.remote(Receiver).options(name=name).remote(3)

    async def scenario() -> tuple[int, int]:
        r = Router({"x": [name], "done": [name]}, 1 << 20, on_undeliverable=undeliverable)
        for data in _messages(10, "x"):
            r.route("x", data)
        await asyncio.wait_for(r.pause(), 10)  # a failed send must not hold the pause
        held = len(r.pending())
        r.resume()
        while len(await receiver.received.remote()) < 10:
            await asyncio.wait_for(r.pause(), 10)
            r.resume()
        return held, r.send_retries

    with deadline(60):
        held, retries = asyncio.run(scenario())
    got = ray.get(receiver.received.remote())
    assert held == 10  # every message was back in the outbox while paused: nothing in limbo
    assert sorted(got) == sorted(_messages(10, "x"))  # each delivered exactly once
    assert retries == 3
    ray.kill(receiver)


def test_a_send_that_keeps_failing_fails_its_tasks_to_a_sink(ray_session, monkeypatch):
    monkeypatch.setattr(router_mod, "_SEND_BACKOFF_S", 0.01)
    agent, sink = f"broken-{os.getpid()}", f"sink-{os.getpid()}"
    broken = ray.remote(Receiver).options(name=agent).remote(10**6)
    receiver = ray.remote(Receiver).options(name=sink).remote(0)

    async def scenario() -> None:
        r = Router({"x": [agent], "done": [sink]}, 1 << 20, on_undeliverable=undeliverable)
        for data in _messages(4, "x"):
            r.route("x", data)
        while len(await receiver.received.remote()) < 4:
            await asyncio.wait_for(r.pause(), 10)
            r.resume()

    with deadline(60):
        asyncio.run(scenario())
    failed = [Task.FromString(d) for d in ray.get(receiver.received.remote())]
    assert sorted(t.task_id for t in failed) == [f"r{i}#0" for i in range(4)]
    for t in failed:
        assert t.status == task_pb2.TASK_STATUS_FAILED and t.error.role == "x"
        assert t.error.attempts == router_mod.SEND_RETRIES + 1
        assert t.error.message.startswith(f"could not be sent to role 'x' after {router_mod.SEND_RETRIES + 1} tries: ")
        assert "object store full (raised by the test's receiver)" in t.error.message
    ray.kill(broken)
    ray.kill(receiver)


# -- a dead source --------------------------------------------------------------------------------

def test_the_source_killed_mid_run_is_restarted_and_every_row_done_once(ray_session, make_job):
    rows = 400
    job = load_job(make_job(QUICK, {"work": {"agent": "agents:work", "replicas": 2}}, "work", rows=rows,
                            run={"max_in_flight": 50, "checkpoint_interval_s": 0.5}))
    killed = []

    def kill_source(r):
        def go():
            while ray_session.get(r.source.stats.remote())["finished"] < 60:
                time.sleep(0.01)
            ray_session.kill(r.source, no_restart=False)
            killed.append(True)
        threading.Thread(target=go, daemon=True).start()

    with deadline(180):
        summary = run(job, progress=False, on_start=kill_source)
    assert killed
    every_row_once(job, rows)
    status = RunStore.open(job.run_dir).status()
    assert summary.done == status["done"] == rows and summary.exit_status == Exit.OK
    assert summary.actor_restarts == 1
    kinds = Counter(e["kind"] for e in RunStore.open(job.run_dir).events())
    assert kinds["actor_restarted"] == 1 and kinds["source_recovered"] == 1


# -- SIGTERM ----------------------------------------------------------------------------------------

SLOWISH = """
import asyncio
from matrix_hpc import DONE

async def work(item, ctx):
    await asyncio.sleep(0.2)
    return "more" if ctx.step == 0 else DONE

more = work
"""


@pytest.mark.slow
def test_sigterm_checkpoints_leaves_no_process_and_resume_finishes(make_job):
    rows = 150
    roles = {"work": {"agent": "agents:work", "concurrency": 200}, "more": {"agent": "agents:more", "concurrency": 200}}
    path = make_job(SLOWISH, roles, "work", rows=rows, run={"max_in_flight": 40, "checkpoint_interval_s": 0.5})
    job = load_job(path)
    proc = cli("run", str(path), "--no-progress")
    try:
        wait_for_snapshot(job.run_dir, proc, committed=1)
        os.kill(proc.pid, signal.SIGTERM)  # what `timeout`, a batch system or a closed terminal send
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == Exit.INTERRUPTED, out
        assert f"matrix-hpc resume {job.run_dir}" in out
        end = time.monotonic() + 30
        while session_processes(proc.pid) and time.monotonic() < end:
            time.sleep(0.2)  # Ray's workers exit once their raylet is gone
        assert session_processes(proc.pid) == []
    finally:
        kill_session(proc.pid)
    kinds = [e["kind"] for e in RunStore.open(job.run_dir).events()]
    assert kinds[-1] == "interrupted" and "checkpoint" in kinds
    kept = len(RunStore.open(job.run_dir).committed())
    assert 0 < kept < rows
    assert resume_ok(job.run_dir)["done"] == rows - kept
    every_row_once(job, rows)


# -- synchronous agents and timeouts -----------------------------------------------------------------

SYNC_SLEEPER = """
import time
from matrix_hpc import DONE

def nap(item, ctx):
    time.sleep(60 if item.n == 0 else 0.05)
    return DONE
"""


def test_a_sync_step_past_its_timeout_fails_on_time_while_the_actor_serves_others(ray_session, make_job):
    rows = 40
    job = load_job(make_job(SYNC_SLEEPER, {"nap": {"agent": "agents:nap", "concurrency": 4, "step_timeout_s": 2}},
                            "nap", rows=rows, run={"retry": {"max_retries": 0, "backoff_s": 0}}))
    with deadline(60):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (rows - 1, 1)
    got = {t.row_id: t for t, _ in results(job)}
    slow = got.pop("r0")
    assert slow.error.message == "StepTimeout: step 0 of role 'nap' ran past its limit of 2s (roles.nap.step_timeout_s)"
    assert slow.error.role == "nap" and slow.error.step == 0 and slow.error.attempts == 1
    took = slow.updated.ToNanoseconds() - slow.created.ToNanoseconds()
    assert 2e9 <= took < 60e9  # failed at its limit, not when its 60 s sleep ended
    # the other 39 rows went through the same actor while the first step slept
    sleep_ends = slow.created.ToNanoseconds() + 60e9
    assert all(t.status == task_pb2.TASK_STATUS_DONE and t.updated.ToNanoseconds() < sleep_ends for t in got.values())
    assert summary.sample_error.startswith("r0#0 (nap, after 1 attempt(s)): StepTimeout: step 0")
    assert summary.failures == {"nap: StepTimeout": 1}


def test_a_step_has_a_default_timeout(ray_session, make_job):
    """A role that sets no step_timeout_s still runs its steps under a limit: the running actor holds
    600 s (the test above shows an actor enforces the limit it holds)."""
    job = load_job(make_job(QUICK, {"work": {"agent": "agents:work"}}, "work", rows=1))
    assert "step_timeout_s" not in job.yaml_text
    limits = []
    with deadline(60):
        run(job, progress=False, on_start=lambda r: limits.append(
            ray_session.get(r.agents["work"][0].stats.remote())["step_timeout_s"]))
    assert limits == [600]


HANGING = """
import time
from matrix_hpc import DONE

def stuck(item, ctx):
    time.sleep(3600 if item.n < 3 else 0.01)
    return DONE
"""


def test_as_many_hung_sync_steps_as_slots_stall_no_other_row(ray_session, make_job):
    """Three rows hang in a role of concurrency 3: each fails at its timeout and its slot goes to the
    next step, so the other rows finish (with a pool of 3 threads they would time out queued)."""
    rows = 30
    job = load_job(make_job(HANGING, {"stuck": {"agent": "agents:stuck", "concurrency": 3, "step_timeout_s": 2}},
                            "stuck", rows=rows, run={"retry": {"max_retries": 0, "backoff_s": 0}}))
    with deadline(120):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (rows - 3, 3)
    got = {t.row_id: t for t, _ in results(job)}
    for row in ("r0", "r1", "r2"):
        assert got[row].error.message == ("StepTimeout: step 0 of role 'stuck' ran past its limit of 2s "
                                          "(roles.stuck.step_timeout_s)"), row
    assert all(t.status == task_pb2.TASK_STATUS_DONE for row, t in got.items() if row not in ("r0", "r1", "r2"))


BLOCKING = """
import time
from matrix_hpc import DONE

async def work(item, ctx):
    time.sleep(3600 if item.n == 0 else 0)  # blocks the actor's event loop: it answers nothing more
    return DONE
"""


def test_an_actor_that_stops_answering_ends_the_run_with_a_message(ray_session, make_job, monkeypatch, capsys):
    """The driver's waits are bounded: an agent whose event loop is blocked answers no call; after the
    bounds (shortened here) the run stops with a message and how to resume, not a hang or a traceback."""
    from matrix_hpc.cli import main
    from matrix_hpc.runtime import recovery

    monkeypatch.setattr(recovery, "CALL_TIMEOUT_S", 2.0)
    monkeypatch.setattr(recovery, "COME_BACK_S", 3.0)
    job = make_job(BLOCKING, {"work": {"agent": "agents:work"}}, "work", rows=5)
    umask = os.umask(0o077)
    try:
        with deadline(120):
            code = main(["run", str(job), "--no-progress"])
    finally:
        os.umask(umask)
    err = capsys.readouterr().err
    assert code == Exit.STOPPED, err
    assert "stopped: actor(s) " in err and "/work/0 did not answer within 3s" in err
    assert "matrix-hpc resume " in err and "Traceback" not in err


@pytest.mark.parametrize("who", ["agent", "sink"])
def test_an_actor_dying_at_the_very_end_of_a_run_changes_nothing(ray_session, make_job, who, capsys):
    """Killed for good between the last commit and the end-of-run calls (final stats, sink close):
    the run still ends with every row done and exit status 0, and says what it could not read."""
    rows = 20
    job = load_job(make_job(QUICK, {"work": {"agent": "agents:work", "replicas": 2}}, "work", rows=rows))

    def kill_at_the_end(runner):
        loop = runner._loop

        def loop_then_kill(already):
            outcome = loop(already)
            victim = runner.agents["work"][0] if who == "agent" else runner.sinks[0]
            ray_session.kill(victim, no_restart=True)
            return outcome
        runner._loop = loop_then_kill

    with deadline(120):
        summary = run(job, progress=False, on_start=kill_at_the_end)
    assert (summary.done, summary.failed, summary.exit_status) == (rows, 0, Exit.OK)
    every_row_once(job, rows)
    said = "did not report its final stats" if who == "agent" else "did not close"
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


# -- exit statuses and counts ------------------------------------------------------------------------

PICKY = """
from matrix_hpc import DONE

async def picky(item, ctx):
    if item.n % 5 == 0:
        raise ValueError(f"cannot handle {item.n}")
    return DONE
"""


@pytest.mark.parametrize(("fraction", "status"), [(0.0, Exit.TASKS_FAILED), (0.2, Exit.OK)])
def test_failed_tasks_set_the_exit_status_and_retries_are_counted(ray_session, make_job, fraction, status):
    rows = 20
    job = load_job(make_job(PICKY, {"picky": {"agent": "agents:picky"}}, "picky", rows=rows,
                            run={"retry": {"max_retries": 1, "backoff_s": 0.01}, "max_failed_fraction": fraction}))
    with deadline(60):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (16, 4)
    assert summary.exit_status == status
    assert summary.retries == 4  # one retry for each of the four failing rows
    assert summary.failures == {"picky: ValueError": 4}
    assert "ValueError: cannot handle" in summary.sample_error
    finished = [e for e in RunStore.open(job.run_dir).events() if e["kind"] == "finished"]
    assert len(finished) == 1
    assert (finished[0]["done"], finished[0]["failed"], finished[0]["retries"]) == (16, 4, 4)
    assert finished[0]["exit_status"] == status


FLAKY = """
from matrix_hpc import DONE

tried = set()

async def first(item, ctx):
    if item.n % 3 == 0 and (ctx.task_id, "first") not in tried:  # rows 0, 3, 6, ...: one failed try
        tried.add((ctx.task_id, "first"))
        raise ConnectionError("flaky")
    return "second"

async def second(item, ctx):
    if item.n % 2 == 0 and (ctx.task_id, "second") not in tried:  # rows 0, 2, 4, ...: one failed try
        tried.add((ctx.task_id, "second"))
        raise ConnectionError("flaky")
    return DONE
"""


def test_retries_are_recorded_on_each_task_and_exported(ray_session, make_job, tmp_path):
    rows = 30
    roles = {"first": {"agent": "agents:first"}, "second": {"agent": "agents:second"}}
    job = load_job(make_job(FLAKY, roles, "first", rows=rows, run={"retry": {"max_retries": 1, "backoff_s": 0}}))
    with deadline(60):
        summary = run(job, progress=False)
    expected = {i: (i % 3 == 0) + (i % 2 == 0) for i in range(rows)}
    assert (summary.done, summary.retries) == (rows, sum(expected.values()))
    assert summary.steps == {"first": rows, "second": rows}
    assert RunStore.open(job.run_dir).status()["retries"] == summary.retries
    export(job.run_dir, tmp_path / "out.jsonl")
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {r["n"]: r["retries"] for r in exported} == expected


def test_every_task_failing_exits_with_tasks_failed(ray_session, make_job):
    agents = "async def boom(item, ctx):\n    raise RuntimeError('no')\n"
    job = load_job(make_job(agents, {"boom": {"agent": "agents:boom"}}, "boom", rows=5,
                            run={"retry": {"max_retries": 0, "backoff_s": 0}}))
    with deadline(60):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed, summary.failed_total) == (0, 5, 5)
    assert summary.exit_status == Exit.TASKS_FAILED


# -- a killed sandbox replica --------------------------------------------------------------------------

SANDBOXED = """
from matrix_hpc import DONE

async def compute(item, ctx):
    result = await ctx.sandbox("py").run(["python3", "-c", f"print({item.n} * 2)"])
    item.text = result.stdout.strip()
    return DONE
"""


def test_a_killed_sandbox_replica_is_restarted_and_every_row_done(ray_session, make_job):
    rows = 40
    path = make_job(SANDBOXED, {"compute": {"agent": "agents:compute", "concurrency": 4}}, "compute", rows=rows,
                    run={"max_in_flight": 8, "retry": {"max_retries": 2, "backoff_s": 0.5}})
    spec = json.loads(path.read_text())
    spec["services"] = {"sandbox": {"py": {"runtime": "bwrap", "image": "python"}}}
    path.write_text(json.dumps(spec))
    job = load_job(path)
    killed = []

    def kill_replica(r):
        endpoint = r.endpoints["sandbox"]["py"]

        def go():
            while ray_session.get(r.source.stats.remote())["finished"] < 8:
                time.sleep(0.02)
            ray_session.kill(endpoint.actors[0], no_restart=False)  # as an OOM kill or a crash would
            killed.append(True)
        threading.Thread(target=go, daemon=True).start()

    with deadline(180):
        summary = run(job, progress=False, on_start=kill_replica)
    assert killed
    # Retries are allowed for the commands running inside the replica as it was killed: the dying
    # server answers them "could not be created (exit status 137)", not UNAVAILABLE. The outage
    # itself (UNAVAILABLE until the restarted replica serves) spends no retry.
    assert (summary.done, summary.failed) == (rows, 0)
    assert sorted(p.text for _, p in results(job)) == sorted(str(i * 2) for i in range(rows))
    assert summary.service_waits >= 1  # the outage was met, waited out, and not counted as a failure


def test_a_step_far_past_its_roles_usual_latency_is_reported_once():
    from collections import deque

    from matrix_hpc.runtime.agent_actor import SLOW_MIN_S, AgentActor

    actor = AgentActor.__new__(AgentActor)  # only the bookkeeping that slow_steps reads
    actor.latencies = deque([0.01] * 20)
    now = time.monotonic()
    actor.started = {"stuck#0": (2, now - SLOW_MIN_S - 5), "busy#0": (0, now - 1)}
    actor.reported_slow = set()
    first = actor.slow_steps()
    assert [(s["task_id"], s["step"], s["usual_s"]) for s in first] == [("stuck#0", 2, 0.01)]
    assert first[0]["running_s"] >= SLOW_MIN_S + 5
    assert actor.slow_steps() == []  # reported once, not every poll
