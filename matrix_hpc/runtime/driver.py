"""The driver: the control plane of a run. It starts the services and actors, shows progress,
takes checkpoints, recovers tasks held by an actor that died, and stops cleanly.

It never sees task messages on the hot path; those go from actor to actor. It touches them only
during a checkpoint or a recovery, both of which pause sending for a moment (recovery.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import ray

from matrix_hpc.job.load import Job, load_job
from matrix_hpc.rundir import RunDir
from matrix_hpc.runtime.agent_actor import AgentActor
from matrix_hpc.runtime.message import Task
from matrix_hpc.runtime.nodes import node_view, write_node_view
from matrix_hpc.runtime.preflight import (  # noqa: F401 - ResumeRefused re-exported
    ResumeRefused,
    open_started,
    refuse_if_changed,
)
from matrix_hpc.runtime.proctitle import titled
from matrix_hpc.runtime.progress import Terminal, describe_actors, percentiles
from matrix_hpc.runtime.recovery import ACTOR_TROUBLE, Recovery, get
from matrix_hpc.runtime.security import (
    LocalRay,
    prepare_run_dir,
    service_secret,
    services_tls,
    use_cluster_token,
)
from matrix_hpc.runtime.services import Endpoints, deploy_all, shutdown_all
from matrix_hpc.runtime.sink import SinkActor
from matrix_hpc.runtime.source import SourceActor
from matrix_hpc.runtime.spread import move_to_preferred_nodes
from matrix_hpc.runtime.summary import RunSummary, failure_breakdown
from matrix_hpc.services.placement import replica_strategies
from matrix_hpc.store import DONE, FAILED, RunStore
from matrix_hpc.store.throughput import SENDING

log = logging.getLogger(__name__)

_POLL_S = 0.1
_HEALTH_S = 1.0
CLOSE_TIMEOUT_S = 600.0  # a sink's last commit, retries included (sink.COMMIT_RETRIES)


def run(job: Job | str | Path, *, run_dir: str | Path | None = None, force: bool = False,
        progress: bool = True, on_start=None, stop_requested: threading.Event | None = None,
        services: Endpoints | None = None) -> RunSummary:
    """Run (or resume, if ``run_dir`` already holds a store) a job on Ray; return its summary.

    Connects to ``RAY_ADDRESS`` if set, else starts a local Ray (or uses the one already
    initialized in this process). ``on_start(run)`` is called once every actor is up.
    Setting ``stop_requested`` (e.g. from a signal handler) stops the run as Ctrl-C does:
    a checkpoint of every task in flight, then an interrupted summary.
    ``services`` (``{kind: {name: endpoint}}``, endpoints from ``deploy``) are used as they are,
    in place of the job's services of the same names, and left running: one engine can serve
    several runs. The job's other services are deployed and stopped as usual.
    """
    if not isinstance(job, Job):
        job = load_job(job, run_dir=run_dir)
    elif run_dir is not None:
        job = dataclasses.replace(job, run_dir=Path(run_dir).resolve())  # the caller's Job is left as it was
    given = _given_services(job, services or {})
    previous_umask = os.umask(0o077)  # what the run writes, and the Ray it starts, are the user's alone
    try:
        prepare_run_dir(job.run_dir)
        with RunDir(job.run_dir).hold("run"):  # one writer at a time: RunDirHeld names the live one
            return _run(job, force=force, progress=progress, stop=stop_requested, services=given,
                        on_start=on_start)
    finally:
        os.umask(previous_umask)


def _run(job: Job, *, force: bool, progress: bool, stop: threading.Event | None, services: Endpoints,
         on_start) -> RunSummary:
    # Opens the store: a refusal comes before Ray.
    runner = _Run(job, force=force, progress=progress, stop=stop, services=services)
    stop_ray = None
    previous: dict = {}
    try:
        runner.term.phase("starting Ray")
        stop_ray = _ensure_ray(job.run_dir)
        previous = _install_stop_signals(runner.stop_requested)  # after ray.init, which installs its own
        runner.term.capture(RunDir(job.run_dir).logs)  # Ray's worker output goes to logs/run.log
        return runner.execute(on_start)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop_ray is not None:
            stop_ray()  # first: worker output that arrives late still goes to the log file
        runner.term.close()


def _install_stop_signals(stop: threading.Event) -> dict:
    """SIGTERM (a batch system, ``timeout``) and SIGHUP (a closed terminal) stop the run like
    Ctrl-C: checkpoint, stop every process, say how to resume."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    return previous


def _ensure_ray(run_dir: Path) -> Callable[[], None] | None:
    """Connect to RAY_ADDRESS (with the run's token) or start a local Ray that only this user can use
    (see ``runtime.security``); return how to stop it, or None if Ray was already initialized."""
    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        use_cluster_token(run_dir)
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return ray.shutdown
    # WARNING: Ray's "Started a local Ray instance" is a phase of our own display already
    local = LocalRay(run_dir, object_store_memory=512 * 1024**2, logging_level=logging.WARNING)
    local.start()
    return local.stop


def _given_services(job: Job, services: Endpoints) -> Endpoints:
    """The already-deployed services a caller hands ``run``; each must be one the job declares."""
    for kind, by_name in services.items():
        for name in by_name:
            if name not in (job.spec.services.get(kind) or {}):
                declared = [f"{k}.{n}" for k, entries in job.spec.services.items() for n in entries or {}]
                raise ValueError(f"run(services=...): the job {job.spec.name!r} declares no {kind} service "
                                 f"{name!r} (it declares: {', '.join(declared) or 'none'})")
    return services


def open_store(job: Job, *, force: bool) -> tuple[RunStore, bool]:
    """Create the run store, or reopen it for a resume (refusing if the job changed)."""
    store = open_started(job)
    if store is None:  # no store yet (or one whose start failed before any task ran): a fresh run
        store = RunStore.create(job.run_dir, job_yaml=job.yaml_text, descriptor_set=job.descriptor_set,
                                payload_type=job.payload_type, fingerprint=job.fingerprint,
                                total_tasks=job.task_count())
        return store, False
    refuse_if_changed(store, job, force=force)
    return store, True


class _Run:
    def __init__(self, job: Job, *, force: bool, progress: bool, stop: threading.Event | None = None,
                 services: Endpoints | None = None):
        self.job = job
        self.spec = job.spec
        self.given = services or {}
        self.store, self.resuming = open_store(job, force=force)
        self.id = uuid.uuid4().hex[:8]
        self.show_progress = progress
        self.term = Terminal(enabled=progress)
        self.snapshot_requested = threading.Event()
        self.stop_requested = stop or threading.Event()
        self.stopped_by: str | None = None
        self.processing_s = 0.0
        self.actors: list = []  # every actor of this run, for cuts, health checks and the final kill
        self.names: dict = {}  # actor -> its name, for messages
        self.agent_stats: dict[tuple[str, str], dict] = {}  # (actor name, incarnation) -> its last stats
        self.sink_stats: dict[tuple[str, str], dict] = {}  # the same for sinks, for the progress line

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
            name=f"{self.id}/source", num_cpus=0, max_restarts=-1, **opts).remote(self.job, directory, skip, restore)
        self.sinks = [
            ray.remote(titled(SinkActor, "sink", label)).options(name=name, num_cpus=0, max_restarts=-1, **opts)
            .remote(self.job, f"{self.id}-sink-{i}", directory, f"{self.id}/source", endpoints)
            for i, name in enumerate(directory["done"])
        ]
        preferred = {}
        self.agents = {role: [] for role in self.spec.roles}
        for role, rs in self.spec.roles.items():
            for name, where in zip(directory[role], replica_strategies(rs.replicas), strict=True):
                actor = (ray.remote(titled(AgentActor, role, label))
                         .options(name=name, num_cpus=rs.num_cpus, num_gpus=rs.num_gpus, max_restarts=-1,
                                  scheduling_strategy=where, **opts)
                         .remote(self.job, role, directory, endpoints))
                self.agents[role].append(actor)
                if where != "DEFAULT":
                    preferred[actor] = where.node_id
        self.actors = [self.source, *self.sinks, *(a for pool in self.agents.values() for a in pool)]
        self.names = {self.source: f"{self.id}/source", **dict(zip(self.sinks, directory["done"], strict=True))}
        for role, pool in self.agents.items():
            self.names.update(zip(pool, directory[role], strict=True))
        move_to_preferred_nodes(preferred, self.names)

    # -- the run ------------------------------------------------------------------------------

    def execute(self, on_start) -> RunSummary:
        self.mark = self.store.mark()  # what this run commits is counted from here
        committed = self.store.committed()
        snap = self.store.latest_snapshot() if self.resuming else None
        saved = {Task.FromString(m).task_id: m for m in (snap[0] if snap else [])}
        restoring = {tid: m for tid, m in saved.items() if tid not in committed}
        restore = list(restoring.values())
        skip = set(committed) | set(saved)
        RunDir(self.job.run_dir).update_record(job=str(self.job.path))  # for `matrix-hpc resume`
        self._event("resumed" if self.resuming else "started", restored=len(restore),
                    committed=len(committed), run_id=self.id)
        t0 = time.monotonic()
        deploying = lambda kind, name, source="": self.term.phase(  # noqa: E731
            f"deploying {kind} service {name!r}" + (f" ({source})" if source else ""))
        to_deploy = {kind: {name: settings for name, settings in (entries or {}).items()
                            if name not in self.given.get(kind, {})}
                     for kind, entries in self.spec.services.items()}
        owned = deploy_all(to_deploy, self.job.dir, on_deploy=deploying, secret=service_secret(self.job.run_dir),
                           tls=services_tls(self.job.run_dir), socket_dir=self.job.run_dir / "sockets")
        self.endpoints = endpoints = {kind: {**owned.get(kind, {}), **self.given.get(kind, {})}
                                      for kind in {*owned, *self.given}}
        outcome = "interrupted"
        finals: list[dict] = []
        try:
            self._start_actors(endpoints, restore, skip)
            self.recovery = Recovery(run_id=self.id, store=self.store, actors=self.actors, names=self.names,
                                     last_state=restoring, event=self._event)
            if on_start:
                on_start(self)
            previous = self._install_sigusr2()
            try:
                outcome = self._loop(len(committed))
            finally:
                if previous is not None:
                    signal.signal(signal.SIGUSR2, previous)
            latency, counts = self._role_stats()
            finals = self._close_sinks()
        finally:
            for a in self.actors:
                ray.kill(a, no_restart=True)
            shutdown_all(owned)
        errors = [f["commit_error"] for f in finals if f.get("commit_error")]
        if errors and not self.stopped_by:
            self.stopped_by = errors[0]
        summary = self._summary(outcome, t0, latency, counts, restore, finals)
        self._event(outcome if not self.stopped_by else "stopped", run_id=self.id, **summary.counts())
        return summary

    def _summary(self, outcome: str, t0: float, latency, counts, restore, finals: list[dict]) -> RunSummary:
        """The run's numbers, counted in the store (exact however often actors restarted)."""
        now = self.store  # reads only the segments committed since it last looked
        this_run = now.tally(since=self.mark)
        after = now.committed()
        done_total = sum(1 for st in after.values() if st == DONE)
        failed = len(after) > done_total
        failures, sample = failure_breakdown(now.iter_results(status=FAILED)) if failed else ({}, None)
        agents, rec = list(self.agent_stats.values()), self.recovery
        return RunSummary(
            run_dir=self.job.run_dir, done=this_run.done, failed=this_run.failed, total=now.total_tasks,
            wall_s=time.monotonic() - t0,
            processing_s=self.processing_s, resumed=len(restore), recovered=rec.recovered,
            checkpoints=rec.checkpoints, interrupted=outcome == "interrupted", step_latency=latency,
            steps=this_run.steps, actor_steps=counts, stopped_by=self.stopped_by, done_total=done_total,
            failed_total=len(after) - done_total, max_failed_fraction=self.spec.run.max_failed_fraction,
            retries=this_run.retries, service_waits=this_run.service_waits,
            commit_retries=sum(f.get("commit_retries", 0) for f in finals),
            send_retries=sum(st.get("send_retries", 0) for st in agents),
            actor_restarts=rec.actor_restarts, checkpoint_failures=rec.checkpoint_failures,
            failures=failures, sample_error=sample,
        )

    def _event(self, kind: str, **fields) -> None:
        """Log an event; a full disk must not turn a clean stop into a crash."""
        try:
            self.store.log_event(kind, **fields)
        except OSError as e:
            log.warning("could not write the %r event to the run's log: %s", kind, e)

    def _loop(self, already: int) -> str:
        """Run until every task is committed ("finished"), Ctrl-C/SIGTERM ("interrupted") or a fault
        that stops the run ("stopped"); the last two after a checkpoint."""
        progress = self.term.progress(self.store.total_tasks, already)
        self.sending_since = time.monotonic()  # processing starts: the throughput's clock (store/throughput.py)
        self._event(SENDING, run_id=self.id)
        get(self.source.start.remote())
        last_checkpoint = last_health = time.monotonic()
        try:
            while True:
                try:
                    src, *sinks = get([self.source.stats.remote(), *[s.stats.remote() for s in self.sinks]])
                except ACTOR_TROUBLE as e:
                    log.warning("the source or a sink did not answer (%s); checking the actors", type(e).__name__)
                    self.recovery.recover_if_needed()
                    continue
                for sink, st in zip(self.sinks, sinks, strict=True):  # a restarted sink counts from zero
                    self.sink_stats[(self.names[sink], st["incarnation"])] = st
                progress.update(done=sum(s["done"] for s in self.sink_stats.values()),
                                failed=sum(s["failed"] for s in self.sink_stats.values()), in_flight=src["in_flight"])
                if src["exhausted"] and src["in_flight"] == 0:
                    self.processing_s = time.monotonic() - self.sending_since
                    progress.close()
                    return "finished"
                fault = next((s["commit_error"] for s in sinks if s.get("commit_error")), None)
                if fault or self.stop_requested.is_set():
                    progress.close()
                    return self._stop(fault)
                now = time.monotonic()
                if now - last_health >= _HEALTH_S:
                    last_health = now
                    self.recovery.recover_if_needed()
                    self._watch_agents()
                if self.snapshot_requested.is_set() or now - last_checkpoint >= self.spec.run.checkpoint_interval_s:
                    self.snapshot_requested.clear()
                    self.recovery.checkpoint()
                    last_checkpoint = time.monotonic()
                time.sleep(_POLL_S)
        except KeyboardInterrupt:
            progress.close()
            return self._stop(None)

    def _stop(self, fault: str | None) -> str:
        """Stop early: save what is in flight, say why and how to go on."""
        self.processing_s = time.monotonic() - self.sending_since
        if fault:
            self.stopped_by = fault
            print(f"\nstopping: {fault}", file=sys.stderr)
            self._event("commit_failed", error=fault)
        else:
            print("\nstopping: saving the tasks in flight ...", file=sys.stderr)
        saved = self.recovery.checkpoint(final=True)
        kept = ("in-flight tasks saved" if saved >= 0
                else "in-flight tasks NOT saved (they restart from the last checkpoint)")
        print(f"{'stopped' if fault else 'interrupted'}: committed rows are kept, {kept}; "
              f"{'after fixing the cause, ' if fault else ''}continue with: matrix-hpc resume {self.job.run_dir}",
              file=sys.stderr)
        return "stopped" if fault else "interrupted"

    def _install_sigusr2(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGUSR2, lambda *_: self.snapshot_requested.set())

    def _watch_agents(self) -> None:
        """Keep every agent's counters (so a dead incarnation's still count), report slow steps and
        write the per-node view (``logs/nodes.json``)."""
        current = []
        for role, pool in self.agents.items():
            for actor, ref in [(a, a.stats.remote(slow=True)) for a in pool]:
                try:
                    st = get(ref)
                except ACTOR_TROUBLE:  # the health check recovers it
                    continue
                self.agent_stats[(self.names[actor], st["incarnation"])] = st
                current.append(st)
                for slow in st.get("slow", []):
                    log.warning("role %s: task %s has been in step %d for %.0fs (usual: %.2fs); still waiting",
                                role, slow["task_id"], slow["step"], slow["running_s"], slow["usual_s"])
                    self._event("slow_step", role=role, **slow)
        try:
            write_node_view(self.job.run_dir, node_view(current, list(self.agent_stats.values())))
        except OSError as e:
            log.warning("could not write the per-node view: %s", e)

    def _role_stats(self) -> tuple[dict[str, dict[str, float]], dict[str, list[int]]]:
        """Step latencies and counts by role. An agent that died (or stopped answering) at the very
        end adds no latencies; its steps are counted as of its last report."""
        latency, counts = {}, {}
        for role, pool in self.agents.items():
            stats = []
            for actor, ref in [(a, a.stats.remote(latencies=True)) for a in pool]:
                try:
                    st = get(ref)
                except ACTOR_TROUBLE as e:
                    log.warning("agent %s did not report its final stats (%s); its step counts are those of its "
                                "last report", self.names[actor], type(e).__name__)
                    continue
                self.agent_stats[(self.names[actor], st["incarnation"])] = st
                stats.append(st)
            latency[role] = percentiles([x for st in stats for x in st["latencies"]])
            # steps of every incarnation, a dead one's included
            counts[role] = [sum(st["steps"] for (name, _), st in self.agent_stats.items() if name == n)
                            for n in (self.names[a] for a in pool)]
        return latency, counts

    def _close_sinks(self) -> list[dict]:
        """Each sink commits what it still buffers and reports its counts. A sink that dies here
        loses nothing: a finished run has committed every row, and an interrupted one checkpointed
        what the sinks held; its counts are those of its last report."""
        finals = []
        for sink, ref in [(s, s.close.remote()) for s in self.sinks]:
            try:
                finals.append(get(ref, timeout=CLOSE_TIMEOUT_S))
            except ACTOR_TROUBLE as e:
                log.warning("sink %s did not close (%s); its counts are those of its last report",
                            self.names[sink], type(e).__name__)
                last = [st for (name, _), st in self.sink_stats.items() if name == self.names[sink]]
                finals.append(last[-1] if last else {})
        return finals
