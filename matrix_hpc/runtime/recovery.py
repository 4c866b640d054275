"""Checkpoints and recovery: the part of the driver that touches task messages.

A checkpoint is a consistent cut (every actor pauses sending, sends in flight land, each actor
reports what it holds) saved to the store. When an actor comes back as a new incarnation, what
it held is re-sent from the last state the run knew of; a restarted source is handed the run back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from matrix_hpc.runtime.message import Task
from matrix_hpc.runtime.sink import describe_write_error
from matrix_hpc.store import RunStore, StoreError

log = logging.getLogger("matrix_hpc.runtime.driver")  # one logger for the driver's messages

CALL_TIMEOUT_S = 120.0  # the most the driver waits for an actor's answer to a control call
COME_BACK_S = 120.0  # the most it waits for a dead or silent actor to answer again
START_S = 600.0  # the most it waits for the actors of a run to start (resources, imports of the job's code)
ACTOR_TROUBLE = (RayActorError, GetTimeoutError)  # dead, restarting, or not answering in time


class ActorsLost(RuntimeError):
    """Actors of the run died for good or stopped answering; the run cannot go on."""


def get(refs, timeout: float | None = None):
    """``ray.get`` with a bound (``CALL_TIMEOUT_S`` unless given): every wait of the driver on an
    actor ends (``GetTimeoutError``)."""
    return ray.get(refs, timeout=CALL_TIMEOUT_S if timeout is None else timeout)


class CutFailed(ActorsLost):
    """No consistent cut could be taken (actors dying or silent); the message says why."""


class Recovery:
    """Checkpoints and recovery over the actors of one run (source first in ``actors``)."""

    def __init__(self, *, run_id: str, store: RunStore, actors: list, names: dict,
                 last_state: dict[str, bytes], event: Callable[..., None]):
        self.run_id = run_id
        self.store = store
        self.actors = actors
        self.source = actors[0]
        self.names = names
        self.last_state = last_state  # task id -> message at the last checkpoint (or restore)
        self.event = event
        try:
            self.incarnations = dict(zip(actors, get([a.ping.remote() for a in actors], START_S), strict=True))
        except GetTimeoutError:
            raise ActorsLost(f"the run's actors did not start within {START_S:.0f}s (does the cluster have the CPUs "
                             f"and GPUs the roles ask for, num_cpus and num_gpus?)") from None
        self.recovered = self.checkpoints = self.checkpoint_failures = self.actor_restarts = 0

    def cut(self, while_paused=None, *, final: bool = False) -> tuple[list[str], dict[str, bytes]]:
        """A consistent cut: pause every sender, wait for sends in flight to land, then ask each
        actor what it holds. Nothing moves between actors in between, so each in-flight task is
        seen exactly once (in an inbox, inside a step as its pre-step message, or unsent).
        ``while_paused(outstanding, held)`` runs before anything moves again. A ``final`` cut (a
        stop) freezes the actors instead: nothing moves again and no step starts after it."""
        for _ in range(10):
            actors = self.actors
            try:
                get([(a.freeze if final else a.pause).remote() for a in actors])
                src, *rest = get([a.collect.remote() for a in actors])
                outstanding, held = src["outstanding"], self._furthest([*src["pending"], *(d for p in rest for d in p)])
                if while_paused is not None:
                    while_paused(outstanding, held)
                if not final:
                    get([a.resume.remote() for a in actors])
                return outstanding, held
            except ACTOR_TROUBLE as e:
                if final:  # a stop: no waiting for restarts (on scancel, Ray itself is going down)
                    raise CutFailed(f"an actor is gone or silent ({type(e).__name__})") from None
                # An actor died during the cut: let the others go on, wait for it, cut again.
                for ref in [a.resume.remote() for a in actors]:
                    try:
                        get(ref)
                    except ACTOR_TROUBLE:
                        pass
                self._handle_restarts(self._wait_alive(), recover=False)
        raise ActorsLost("could not take a consistent snapshot: actors keep dying")

    @staticmethod
    def _furthest(messages: list[bytes]) -> dict[str, bytes]:
        held: dict[str, tuple[int, bytes]] = {}  # task id -> (step, message): the furthest copy wins
        for data in messages:
            t = Task.FromString(data)
            if t.task_id not in held or held[t.task_id][0] < t.step:
                held[t.task_id] = (t.step, data)
        return {tid: data for tid, (_, data) in held.items()}

    def checkpoint(self, *, final: bool = False) -> int:
        """Snapshot every task in flight into the store; return how many (-1 if it could not be written).
        ``final``: the checkpoint of a stop, after which no step starts (see ``cut``)."""
        t0 = time.monotonic()
        try:
            outstanding, held = self.cut(final=final)
        except CutFailed as e:
            if not final:
                raise
            self.checkpoint_failures += 1
            log.error("the checkpoint of the stop could not be taken: %s; in-flight tasks restart from the last "
                      "checkpoint", e)
            self.event("checkpoint_failed", tasks=0, error=str(e))
            return -1
        messages = list(held.values())
        try:
            self.store.write_snapshot(messages, meta={"run_id": self.run_id, "in_flight": len(messages)})
        except (OSError, StoreError) as e:
            # Tasks are not lost: they stay where they are; a resume restarts them from the last
            # checkpoint that was written (or from their row).
            self.checkpoint_failures += 1
            error = describe_write_error(e, self.store.run_dir, sum(map(len, messages)))
            log.error("checkpoint of %d task(s) in flight failed: %s", len(messages), error)
            self.event("checkpoint_failed", tasks=len(messages), error=error)
            try:
                self._reinject_lost(outstanding, held)
            except ACTOR_TROUBLE:
                log.warning("the source died during a checkpoint; recovering")
            return -1
        seconds = time.monotonic() - t0
        self.last_state = dict(held)
        self.checkpoints += 1
        log.info("checkpoint: %d task(s) in flight saved in %.2fs", len(messages), seconds)
        self.event("checkpoint", tasks=len(messages), bytes=sum(map(len, messages)), seconds=round(seconds, 3))
        try:
            get(self.source.remember.remote(messages))
            self._reinject_lost(outstanding, held)
        except ACTOR_TROUBLE:  # the source died just now: the next health check hands the run back to it
            log.warning("the source died during a checkpoint; recovering")
        return len(messages)

    def _wait_alive(self) -> list:
        """Ping every actor until all answer (restarting ones take a moment, ``COME_BACK_S`` at most);
        return the ones that came back as a new incarnation, having lost what they held."""
        changed, pending = [], list(self.actors)
        timeout = COME_BACK_S
        end = time.monotonic() + timeout
        while pending:
            refs = {a.ping.remote(): a for a in pending}
            ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=max(0.1, end - time.monotonic()))
            pending = [refs[r] for r in not_ready]
            for ref in ready:
                actor = refs[ref]
                try:
                    incarnation = get(ref)
                except RayActorError:
                    pending.append(actor)
                    continue
                if incarnation != self.incarnations[actor]:
                    changed.append(actor)
                    self.incarnations[actor] = incarnation
            if pending:
                if time.monotonic() > end:
                    names = ", ".join(self.names.get(a, "?") for a in pending)
                    raise ActorsLost(f"actor(s) {names} did not answer within {timeout:.0f}s (dead for good, or "
                                     f"an event loop blocked: an async agent calling blocking code?)")
                time.sleep(0.2)
        return changed

    def recover_if_needed(self) -> None:
        self._handle_restarts(self._wait_alive())

    def _handle_restarts(self, changed: list, *, recover: bool = True) -> None:
        """Note restarted actors; recover what they held (a restarted source gets the run back)."""
        for actor in changed:
            self.actor_restarts += 1
            log.warning("actor %s died and was restarted", self.names.get(actor, "?"))
            self.event("actor_restarted", actor=self.names.get(actor, "?"))
        if self.source in changed:
            self._recover_source()
        elif changed and recover:
            log.warning("recovering the tasks the restarted actor(s) held")
            outstanding, held = self.cut()
            self._reinject_lost(outstanding, held)

    def _recover_source(self) -> None:
        """The source restarted empty: hand it what the other actors hold and what is committed."""
        def adopt(_outstanding: list[str], held: dict[str, bytes]) -> None:
            committed = self.store.committed()
            in_flight = {tid: m for tid, m in held.items() if tid not in committed}
            restore = {tid: m for tid, m in self.last_state.items() if tid not in committed and tid not in in_flight}
            skip = set(committed) | set(in_flight) | set(restore)
            get(self.source.adopt.remote(list(in_flight.values()), list(restore.values()), list(skip)))
            self.recovered += len(restore)
            log.warning("source restarted: %d task(s) in flight taken over, %d restored from the last checkpoint",
                        len(in_flight), len(restore))
            self.event("source_recovered", in_flight=len(in_flight), restored=len(restore))
        self.cut(while_paused=adopt)

    def _reinject_lost(self, outstanding: list[str], held: dict[str, bytes]) -> None:
        """Re-send the tasks in flight that no actor holds. Those among them already committed were
        committed by a sink that died before telling the source: they only free their places."""
        missing = [tid for tid in outstanding if tid not in held]
        if not missing:
            return
        committed = self.store.committed()
        unreported = [tid for tid in missing if tid in committed]
        if unreported:
            log.warning("%d task(s) committed by a sink that died before telling the source; no longer in flight",
                        len(unreported))
            get(self.source.finished.remote(unreported))
            self.event("committed_unreported", tasks=len(unreported))
        lost = [tid for tid in missing if tid not in committed]
        if lost:
            log.warning("re-sending %d task(s) lost with a dead actor, from their last known state", len(lost))
            n = get(self.source.reinject.remote(lost))
            self.recovered += n
            self.event("recovered", tasks=n)
