"""The task runtime end to end, on a real local Ray: routing, exactly-once results,
backpressure, failing agents, large payloads, and an actor killed mid-run."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import pytest
from conftest import deadline
from google.protobuf import message_factory

from matrix_hpc import load_job, run
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.protogen import pool_from_descriptor_set
from matrix_hpc.services.llm import LLMSpec, deploy
from matrix_hpc.store import RunStore

THREE_ROLES = """
from matrix_hpc import DONE

async def a(item, ctx):
    item.path.append("a")
    return "b"

async def b(item, ctx):
    item.path.append("b")
    return "c"

async def c(item, ctx):
    item.path.append("c")
    item.n *= 10
    return DONE
"""


def results(job) -> list[tuple[task_pb2.Task, object]]:
    """Every committed task of a run, with its payload decoded from the stored descriptor set."""
    cls = message_factory.GetMessageClass(pool_from_descriptor_set(job.descriptor_set).FindMessageTypeByName(job.payload_type))
    out = []
    for data in RunStore.open(job.run_dir).iter_results():
        t = task_pb2.Task.FromString(data)
        p = cls()
        t.payload.Unpack(p)
        out.append((t, p))
    return out


def test_messages_route_through_several_roles(ray_session, make_job):
    job = load_job(make_job(THREE_ROLES, {r: {"agent": f"agents:{r}"} for r in "abc"}, "a", rows=50))
    with deadline(120):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (50, 0)
    got = results(job)
    assert sorted(t.row_id for t, _ in got) == sorted(f"r{i}" for i in range(50))
    for t, p in got:
        assert list(p.path) == ["a", "b", "c"]
        assert list(t.trace) == ["a", "b", "c"]
        assert t.step == 3 and t.status == task_pb2.TASK_STATUS_DONE
        assert p.n == int(t.row_id[1:]) * 10
    assert set(summary.step_latency) == {"a", "b", "c"}


def test_thousands_of_tasks_each_committed_exactly_once(ray_session, make_job):
    roles = {r: {"agent": f"agents:{r}", "replicas": 2} for r in "abc"}
    job = load_job(make_job(THREE_ROLES, roles, "a", rows=2000, dataset={"trials": 2},
                            run={"max_in_flight": 600, "sinks": 2}))
    with deadline(180):
        summary = run(job, progress=False)
    assert summary.done == 4000
    ids = Counter(t.task_id for t, _ in results(job))
    assert len(ids) == 4000 and max(ids.values()) == 1
    assert {t.trial for t, _ in results(job)} == {0, 1}


def test_backpressure_holds_in_flight_at_the_bound(ray_session, make_job):
    agents = """
import asyncio
from matrix_hpc import DONE

async def slow(item, ctx):
    await asyncio.sleep(0.02)
    return DONE
"""
    bound = 40
    job = load_job(make_job(agents, {"slow": {"agent": "agents:slow", "replicas": 2, "concurrency": 1000}},
                            "slow", rows=600, run={"max_in_flight": bound}))
    seen: list[int] = []

    def watch(r):
        def poll():
            while not stop.is_set():
                try:
                    stats = ray_session.get([a.stats.remote() for a in r.agents["slow"]])
                except ray_session.exceptions.RayActorError:  # the run ended and its actors are gone
                    return
                seen.append(sum(s["inbox"] + s["active"] for s in stats))
        threading.Thread(target=poll, daemon=True).start()

    stop = threading.Event()
    with deadline(120):
        summary = run(job, progress=False, on_start=watch)
    stop.set()
    assert summary.done == 600
    assert max(seen) <= bound
    assert max(seen) >= bound // 2  # the bound, not something else, was what limited the run


def test_a_raising_agent_fails_its_rows_and_the_rest_finish(ray_session, make_job):
    agents = """
from matrix_hpc import DONE

async def picky(item, ctx):
    if item.n % 7 == 0:
        raise ValueError(f"cannot handle {item.n}")
    return DONE
"""
    job = load_job(make_job(agents, {"picky": {"agent": "agents:picky"}}, "picky", rows=70,
                            run={"retry": {"max_retries": 2, "backoff_s": 0.01}}))
    with deadline(120):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (60, 10)
    failed = [t for t, _ in results(job) if t.status == task_pb2.TASK_STATUS_FAILED]
    assert sorted(int(t.row_id[1:]) for t in failed) == list(range(0, 70, 7))
    for t in failed:
        assert t.error.role == "picky"
        assert t.error.message == f"ValueError: cannot handle {t.row_index}"
        assert "raise ValueError" in t.error.traceback
        assert t.error.attempts == 3


def test_an_unknown_next_role_fails_the_task_with_a_clear_error(ray_session, make_job):
    agents = """
async def lost(item, ctx):
    return "nobody"
"""
    job = load_job(make_job(agents, {"lost": {"agent": "agents:lost"}}, "lost", rows=3))
    with deadline(60):
        summary = run(job, progress=False)
    assert summary.failed == 3
    t, _ = results(job)[0]
    assert t.error.message == ("UnknownRole: agent agents:lost returned 'nobody', which is not a role of this "
                               "job (roles: lost; return matrix_hpc.DONE to finish the task)")
    assert t.error.traceback == f'  File "{job.dir / "agents.py"}", line 2, in lost\n'


def test_a_bad_row_fails_alone(ray_session, make_job):
    rows = [{"id": "ok1", "n": 1}, {"id": "bad", "n": "not a number"}, {"id": "ok2", "n": 2}]
    agents = "from matrix_hpc import DONE\nasync def f(item, ctx):\n    return DONE\n"
    job = load_job(make_job(agents, {"f": {"agent": "agents:f"}}, "f", rows=rows))
    with deadline(60):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (2, 1)
    bad = next(t for t, _ in results(job) if t.row_id == "bad")
    assert bad.error.role == "source" and "n" in bad.error.message


def test_large_payloads_travel_by_reference_intact(ray_session, make_job):
    agents = """
from matrix_hpc import DONE

async def grow(item, ctx):
    item.blob = bytes([item.n % 256]) * 400_000
    return "check"

async def check(item, ctx):
    assert item.blob == bytes([item.n % 256]) * 400_000
    item.text = "ok"
    return DONE
"""
    job = load_job(make_job(agents, {"grow": {"agent": "agents:grow"}, "check": {"agent": "agents:check"}},
                            "grow", rows=20, run={"large_payload_bytes": 100_000}))
    with deadline(120):
        summary = run(job, progress=False)
    assert (summary.done, summary.failed) == (20, 0)
    assert all(p.text == "ok" and len(p.blob) == 400_000 for _, p in results(job))


def test_a_killed_agent_actor_loses_no_task(ray_session, make_job):
    agents = """
import asyncio
from matrix_hpc import DONE

async def first(item, ctx):
    await asyncio.sleep(0.05)
    item.path.append("first")
    return "second"

async def second(item, ctx):
    await asyncio.sleep(0.05)
    item.path.append("second")
    return DONE
"""
    roles = {"first": {"agent": "agents:first", "replicas": 2}, "second": {"agent": "agents:second", "replicas": 2}}
    job = load_job(make_job(agents, roles, "first", rows=300, run={"max_in_flight": 100}))
    killed = []

    def killer(r):
        def kill_when_busy():
            victim = r.agents["second"][0]
            while True:
                st = ray_session.get(victim.stats.remote())
                if st["active"] + st["inbox"] >= 5:
                    ray_session.kill(victim, no_restart=False)
                    killed.append(st["active"] + st["inbox"])
                    return
                time.sleep(0.01)
        threading.Thread(target=kill_when_busy, daemon=True).start()

    with deadline(180):
        summary = run(job, progress=False, on_start=killer)
    assert killed, "the actor was never busy enough to be killed"
    got = results(job)
    assert Counter(t.task_id for t, _ in got) == Counter({f"r{i}#0": 1 for i in range(300)})
    assert all(t.status == task_pb2.TASK_STATUS_DONE and list(p.path) == ["first", "second"] for t, p in got)
    assert summary.recovered >= 1
    assert summary.actor_restarts == 1 and summary.done == summary.done_total == 300
    # the dead actor's steps count too: every committed task made one step of each role
    assert summary.steps == {"first": 300, "second": 300}
    finished = [e for e in RunStore.open(job.run_dir).events() if e["kind"] == "finished"]
    assert [e["steps"] for e in finished] == [{"first": 300, "second": 300}]
    assert RunStore.open(job.run_dir).status()["steps_by_role"] == {"first": 300, "second": 300}


def test_python_api_accepts_a_path(ray_session, make_job):
    path = make_job(THREE_ROLES, {r: {"agent": f"agents:{r}"} for r in "abc"}, "a", rows=5)
    with deadline(60):
        summary = run(path, progress=False)
    assert summary.done == 5 and summary.run_dir == path.parent / "out"


def test_load_is_spread_over_replicas(ray_session, make_job):
    agents = """
import asyncio
from matrix_hpc import DONE

async def work(item, ctx):
    await asyncio.sleep(0.01)
    return DONE
"""
    job = load_job(make_job(agents, {"work": {"agent": "agents:work", "replicas": 3}}, "work", rows=900))
    with deadline(120):
        summary = run(job, progress=False)
    counts = summary.actor_steps["work"]
    assert sum(counts) == 900
    assert min(counts) >= 900 * 0.15, counts


ASKING = """
from matrix_hpc import DONE

async def ask(item, ctx):
    item.text = (await ctx.llm("smol").chat(item.text)).text
    return DONE
"""


def test_an_already_deployed_service_serves_several_runs_and_stays_up(ray_session, make_job):
    shared = deploy("shared", LLMSpec.model_validate({"backend": "scripted",
                                                      "scripted": {"mode": "canned", "replies": ["shared"]}}))
    own = {"llm": {"smol": {"backend": "scripted", "scripted": {"mode": "canned", "replies": ["own"]}}}}
    try:
        for name in ("one", "two"):
            job = load_job(make_job(ASKING, {"ask": {"agent": "agents:ask"}}, "ask", rows=5, name=name, services=own))
            with deadline(60):
                summary = run(job, progress=False, services={"llm": {"smol": shared}})
            assert summary.done == 5
            assert [p.text for _, p in results(job)] == ["shared"] * 5  # not the job's own engine
        with pytest.raises(ValueError, match=r"declares no llm service 'other' \(it declares: llm.smol\)"):
            run(job, run_dir=job.run_dir.parent / "never", services={"llm": {"other": shared}})
        assert not (job.run_dir.parent / "never").exists()
    finally:
        shared.shutdown()


def test_an_actor_away_from_its_node_is_restarted_until_the_tries_run_out(ray_session, tmp_path, caplog):
    from matrix_hpc.runtime.spread import move_to_preferred_nodes

    ray = ray_session

    @ray.remote(max_restarts=-1, num_cpus=0)
    class Placed:  # notes each of its starts in ``log`` (a file)
        def __init__(self, log: str):
            with open(log, "a") as f:
                f.write("started\n")
            self.incarnation = os.urandom(8).hex()

        def where(self) -> tuple[str, str]:
            return self.incarnation, ray.get_runtime_context().get_node_id()

    here = ray.get_runtime_context().get_node_id()
    placed = Placed
    home, away = placed.remote(str(tmp_path / "home")), placed.remote(str(tmp_path / "away"))
    with deadline(120):
        move_to_preferred_nodes({home: here, away: "f" * 56}, {home: "role/0", away: "role/1"}, tries=2)
    assert (tmp_path / "home").read_text() == "started\n"  # on its node: never restarted
    assert (tmp_path / "away").read_text() == "started\n" * 3  # its first start and 2 restarts
    assert "role/1 run(s) away from the node meant for them" in caplog.text
    assert ray.get(away.where.remote())[1] == here  # still serving after the restarts


def test_a_burst_leaves_in_batches_of_at_most_max_batch(ray_session):
    import asyncio

    from matrix_hpc.runtime.router import MAX_BATCH, Router

    ray = ray_session

    @ray.remote(num_cpus=0)
    class Receiver:
        def __init__(self):
            self.batches = []

        def deliver(self, items: list) -> int:
            self.batches.append(len(items))
            return 0

        def received(self) -> list[int]:
            return self.batches

    receiver = Receiver.options(name="burst-receiver").remote()
    burst = 3 * MAX_BATCH + 5

    async def main():
        router = Router({"next": ["burst-receiver"]}, large_payload_bytes=1 << 20)
        for i in range(burst):
            router.route("next", b"m%d" % i)
        end = time.monotonic() + 60
        while router.sent_messages < burst and time.monotonic() < end:
            await asyncio.sleep(0.01)  # the sends run on this loop

    asyncio.run(main())
    batches = ray.get(receiver.received.remote())
    assert sum(batches) == burst and max(batches) == MAX_BATCH and len(batches) >= 4, batches
    ray.kill(receiver)
