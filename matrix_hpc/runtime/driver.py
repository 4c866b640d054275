"""The driver: the control plane of a run. It starts the services and actors, shows progress,
takes checkpoints, recovers tasks held by an actor that died, and stops cleanly.

It never sees task messages on the hot path; those go from actor to actor. It touches them only
during a checkpoint or a recovery, both of which pause sending for a moment (see ``_cut``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from matrix_hpc.job.dataset import count_rows
from matrix_hpc.job.load import Job, load_job
from matrix_hpc.runtime.agent_actor import AgentActor
from matrix_hpc.runtime.message import Task
from matrix_hpc.runtime.preflight import ResumeRefused, refuse_if_changed  # noqa: F401 - ResumeRefused re-exported
from matrix_hpc.runtime.proctitle import titled
from matrix_hpc.runtime.progress import Terminal, describe_actors, percentiles
from matrix_hpc.runtime.services import deploy_all, shutdown_all
from matrix_hpc.runtime.sink import SinkActor
from matrix_hpc.runtime.source import SourceActor
from matrix_hpc.store import RunStore, StoreError

log = logging.getLogger(__name__)

_POLL_S = 0.1
_HEALTH_S = 1.0


@dataclass
class RunSummary:
    run_dir: Path
    done: int
    failed: int
    total: int
    wall_s: float
    resumed: int = 0  # tasks restored from a snapshot at start
    recovered: int = 0  # tasks re-sent after an actor died
    checkpoints: int = 0
    interrupted: bool = False
    step_latency: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> p50/p99 seconds
    step_counts: dict[str, list[int]] = field(default_factory=dict)  # role -> steps done by each actor
    processing_s: float = 0.0  # from the first task sent to the last one committed (no start-up, no teardown)

    @property
    def throughput(self) -> float:
        return (self.done + self.failed) / self.wall_s if self.wall_s else 0.0


def run(job: Job | str | Path, *, run_dir: str | Path | None = None, force: bool = False,
        progress: bool = True, on_start=None) -> RunSummary:
    """Run (or resume, if ``run_dir`` already holds a store) a job on Ray; return its summary.

    Connects to ``RAY_ADDRESS`` if set, else starts a local Ray (or uses the one already
    initialized in this process). ``on_start(run)`` is called once every actor is up.
    """
    if not isinstance(job, Job):
        job = load_job(job, run_dir=run_dir)
    elif run_dir is not None:
        job.run_dir = Path(run_dir).resolve()
    runner = _Run(job, force=force, progress=progress)  # opens the store: a refusal comes before Ray
    started_ray = False
    try:
        runner.term.phase("starting Ray")
        started_ray = _ensure_ray()
        runner.term.capture(job.run_dir / "logs")  # Ray's worker output goes to logs/run.log
        return runner.execute(on_start)
    finally:
        if started_ray:
            ray.shutdown()  # first: worker output that arrives late still goes to the log file
        runner.term.close()


def _ensure_ray() -> bool:
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # A local Ray lives on loopback only.
        ray.init(include_dashboard=False, object_store_memory=512 * 1024**2, _node_ip_address="127.0.0.1")
    return True


def open_store(job: Job, *, force: bool) -> tuple[RunStore, bool]:
    """Create the run store, or reopen it for a resume (refusing if the job changed)."""
    try:
        store = RunStore.open(job.run_dir)
    except StoreError:  # no store yet: a fresh run
        total = count_rows(job.dataset_path, job.spec.dataset.limit) * job.spec.dataset.trials
        store = RunStore.create(job.run_dir, job_yaml=job.yaml_text, descriptor_set=job.descriptor_set,
                                payload_type=job.payload_type, fingerprint=job.fingerprint, total_tasks=total)
        return store, False
    refuse_if_changed(store, job, force=force)
    return store, True


class _Run:
    def __init__(self, job: Job, *, force: bool, progress: bool):
        self.job = job
        self.spec = job.spec
        self.store, self.resuming = open_store(job, force=force)
        self.id = uuid.uuid4().hex[:8]
        self.show_progress = progress
        self.term = Terminal(enabled=progress)
        self.recovered = self.checkpoints = 0
        self.snapshot_requested = threading.Event()
        self.processing_s = 0.0
        self.actors: list = []  # every actor of this run, for cuts, health checks and the final kill

    # -- set-up -------------------------------------------------------------------------------

    def _names(self) -> dict[str, list[str]]:
        d = {role: [f"{self.id}/{role}/{i}" for i in range(rs.replicas)] for role, rs in self.spec.roles.items()}
        d["done"] = [f"{self.id}/sink/{i}" for i in range(self.spec.run.sinks)]
        return d

    def _start_actors(self, endpoints: dict, restore: list[bytes], skip: set[str]) -> None:
        directory = self._names()
        opts = {"max_concurrency": 10_000}
        self.term.phase(describe_actors(self.spec))
        label = f"{self.spec.name}:{self.id}"
        self.source = ray.remote(titled(SourceActor, "source", label)).options(
            name=f"{self.id}/source", num_cpus=0, **opts).remote(self.job, directory, skip, restore)
        self.sinks = [
            ray.remote(titled(SinkActor, "sink", label)).options(name=name, num_cpus=0, max_restarts=-1, **opts)
            .remote(self.job, f"{self.id}-sink-{i}", directory, f"{self.id}/source", str(self.job.run_dir), endpoints)
            for i, name in enumerate(directory["done"])
        ]
        self.agents = {
            role: [
                ray.remote(titled(AgentActor, role, label))
                .options(name=name, num_cpus=rs.num_cpus, num_gpus=rs.num_gpus, max_restarts=-1, **opts)
                .remote(self.job, role, directory, endpoints)
                for name in directory[role]
            ]
            for role, rs in self.spec.roles.items()
        }
        self.actors = [self.source, *self.sinks, *(a for pool in self.agents.values() for a in pool)]
        self.incarnations = dict(zip(self.actors, ray.get([a.ping.remote() for a in self.actors]), strict=True))

    # -- the run ------------------------------------------------------------------------------

    def execute(self, on_start) -> RunSummary:
        committed = self.store.committed()
        snap = self.store.latest_snapshot() if self.resuming else None
        saved = {Task.FromString(m).task_id: m for m in (snap[0] if snap else [])}
        restore = [m for tid, m in saved.items() if tid not in committed]
        skip = set(committed) | set(saved)
        (self.job.run_dir / "job_path.txt").write_text(f"{self.job.path}\n")  # for `matrix-hpc resume`
        self.store.log_event("resumed" if self.resuming else "started", restored=len(restore),
                             committed=len(committed), run_id=self.id)
        t0 = time.monotonic()
        deploying = lambda kind, name: self.term.phase(f"deploying {kind} service {name!r}")  # noqa: E731
        self.endpoints = endpoints = deploy_all(self.spec.services, self.job.dir, on_deploy=deploying)
        interrupted = False
        try:
            self._start_actors(endpoints, restore, skip)
            if on_start:
                on_start(self)
            previous = self._install_sigusr2()
            try:
                interrupted = not self._loop(len(committed))
            finally:
                if previous is not None:
                    signal.signal(signal.SIGUSR2, previous)
            latency, counts = self._role_stats()
            finals = ray.get([s.close.remote() for s in self.sinks])
        finally:
            for a in self.actors:
                ray.kill(a, no_restart=True)
            shutdown_all(endpoints)
        status = self.store.status()
        summary = RunSummary(
            run_dir=self.job.run_dir, done=sum(f["done"] for f in finals), failed=sum(f["failed"] for f in finals),
            total=status["total"], wall_s=time.monotonic() - t0, processing_s=self.processing_s,
            resumed=len(restore), recovered=self.recovered,
            checkpoints=self.checkpoints, interrupted=interrupted, step_latency=latency, step_counts=counts,
        )
        self.store.log_event("interrupted" if interrupted else "finished", done=summary.done, failed=summary.failed)
        return summary

    def _loop(self, already: int) -> bool:
        """Run until every task is committed (True) or Ctrl-C (False, after a checkpoint)."""
        progress = self.term.progress(self.store.total_tasks, already)
        started = time.monotonic()
        ray.get(self.source.start.remote())
        last_checkpoint = last_health = time.monotonic()
        try:
            while True:
                try:
                    src, *sinks = ray.get([self.source.stats.remote(), *[s.stats.remote() for s in self.sinks]])
                except RayActorError:
                    self._recover_if_needed()
                    continue
                progress.update(done=sum(s["done"] for s in sinks), failed=sum(s["failed"] for s in sinks),
                                in_flight=src["in_flight"])
                if src["exhausted"] and src["in_flight"] == 0:
                    self.processing_s = time.monotonic() - started
                    progress.close()
                    return True
                now = time.monotonic()
                if now - last_health >= _HEALTH_S:
                    last_health = now
                    self._recover_if_needed()
                if self.snapshot_requested.is_set() or now - last_checkpoint >= self.spec.run.checkpoint_interval_s:
                    self.snapshot_requested.clear()
                    self.checkpoint()
                    last_checkpoint = time.monotonic()
                time.sleep(_POLL_S)
        except KeyboardInterrupt:
            progress.close()
            print("\ninterrupted: saving in-flight tasks ...", file=sys.stderr)
            self.checkpoint()
            return False

    def _install_sigusr2(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGUSR2, lambda *_: self.snapshot_requested.set())

    # -- checkpoints and recovery ---------------------------------------------------------------

    def _cut(self) -> tuple[list[str], dict[str, bytes]]:
        """A consistent cut: pause every sender, wait for sends in flight to land, then ask each
        actor what it holds. Nothing moves between actors in between, so each in-flight task is
        seen exactly once (in an inbox, inside a step as its pre-step message, or unsent)."""
        for _ in range(10):
            actors = self.actors
            try:
                ray.get([a.pause.remote() for a in actors])
                src, *rest = ray.get([a.collect.remote() for a in actors])
                ray.get([a.resume.remote() for a in actors])
                break
            except RayActorError:
                # An actor died during the cut: let the others go on, wait for it, cut again.
                for ref in [a.resume.remote() for a in actors]:
                    try:
                        ray.get(ref)
                    except RayActorError:
                        pass
                self._wait_alive()
        else:
            raise RuntimeError("could not take a consistent snapshot: actors keep dying")
        held: dict[str, tuple[int, bytes]] = {}  # task id -> (step, message): the furthest copy wins
        for data in [*src["pending"], *(d for part in rest for d in part)]:
            t = Task.FromString(data)
            if t.task_id not in held or held[t.task_id][0] < t.step:
                held[t.task_id] = (t.step, data)
        return src["outstanding"], {tid: data for tid, (_, data) in held.items()}

    def checkpoint(self) -> int:
        """Snapshot every task in flight into the store; return how many."""
        t0 = time.monotonic()
        outstanding, held = self._cut()
        messages = list(held.values())
        self.store.write_snapshot(messages, meta={"run_id": self.id, "in_flight": len(messages)})
        ray.get(self.source.remember.remote(messages))
        self.checkpoints += 1
        log.info("checkpoint: %d task(s) in flight saved in %.2fs", len(messages), time.monotonic() - t0)
        self._reinject_lost(outstanding, held)
        return len(messages)

    def _wait_alive(self, timeout: float = 120) -> list:
        """Ping every actor until all answer (restarting ones take a moment); return the ones
        that came back as a new incarnation, having lost what they held."""
        changed, pending = [], list(self.actors)
        end = time.monotonic() + timeout
        while pending:
            refs = {a.ping.remote(): a for a in pending}
            ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=max(0.1, end - time.monotonic()))
            pending = [refs[r] for r in not_ready]
            for ref in ready:
                actor = refs[ref]
                try:
                    incarnation = ray.get(ref)
                except RayActorError:
                    if actor is self.source:
                        raise RuntimeError("the source actor died; resume the run to continue from the last "
                                           "checkpoint") from None
                    pending.append(actor)
                    continue
                if incarnation != self.incarnations[actor]:
                    changed.append(actor)
                    self.incarnations[actor] = incarnation
            if pending:
                if time.monotonic() > end:
                    raise RuntimeError(f"{len(pending)} actor(s) did not come back within {timeout:.0f}s")
                time.sleep(0.2)
        return changed

    def _recover_if_needed(self) -> None:
        if self._wait_alive():
            log.warning("actor(s) restarted; recovering the tasks they held")
            outstanding, held = self._cut()
            self._reinject_lost(outstanding, held)

    def _reinject_lost(self, outstanding: list[str], held: dict[str, bytes]) -> None:
        lost = [tid for tid in outstanding if tid not in held]
        if lost:
            committed = self.store.committed()
            lost = [tid for tid in lost if tid not in committed]
        if lost:
            log.warning("re-sending %d task(s) lost with a dead actor, from their last known state", len(lost))
            self.recovered += ray.get(self.source.reinject.remote(lost))

    def _role_stats(self) -> tuple[dict[str, dict[str, float]], dict[str, list[int]]]:
        latency, counts = {}, {}
        for role, pool in self.agents.items():
            stats = ray.get([a.stats.remote(latencies=True) for a in pool])
            latency[role] = percentiles([x for st in stats for x in st["latencies"]])
            counts[role] = [st["steps"] for st in stats]
        return latency, counts
