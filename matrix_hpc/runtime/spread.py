"""Where agent actors run on a cluster: a role's replicas are spread over the nodes like service
replicas (``services.placement.replica_strategies``: replica ``i`` prefers node ``i``, mod the node
count), so that no node sits idle for a role (Ray's own SPREAD is best effort).

The preference is soft, so that Ray restarts an actor elsewhere when its node dies. The price: Ray
may start an actor elsewhere although its node is alive (seen on a fresh allocation under load: a
whole role on one node, the other idle); ``move_to_preferred_nodes`` restarts such actors there
before any task is sent.
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from matrix_hpc.runtime.recovery import get

log = logging.getLogger(__name__)


def move_to_preferred_nodes(preferred: dict, names: dict, tries: int = 3) -> None:
    """Restart each actor of ``preferred`` (actor -> node id) that runs elsewhere, ``tries`` times at
    most; one still away after that is named in a warning (the run goes on). The actors answer
    ``where()``: (incarnation, node id)."""
    killed: dict = {}  # actor -> the incarnation killed
    for attempt in range(tries + 1):
        ran_on = _nodes(list(preferred), killed)
        if ran_on is None:
            return  # an actor silent or dying again and again: the run's health checks deal with it
        away = {actor: incarnation for actor, (incarnation, node) in zip(preferred, ran_on, strict=True)
                if node != preferred[actor]}
        if not away:
            return
        if attempt == tries:
            log.warning("%s run(s) away from the node meant for them: that node gets less work",
                        ", ".join(names[a] for a in away))
            return
        for actor in away:
            log.info("%s started on another node than its own; restarting it there", names[actor])
            ray.kill(actor, no_restart=False)
        killed = away


def _nodes(actors: list, killed: dict, asks: int = 20) -> list[tuple[str, str]] | None:
    """Each actor's ``where()``, from a new incarnation for those ``killed`` (a call may still reach
    the one being killed, or fail with it)."""
    for _ in range(asks):
        try:
            answers = get([actor.where.remote() for actor in actors])
        except GetTimeoutError:
            return None  # one does not answer: not worth more waits of CALL_TIMEOUT_S here
        except RayActorError:
            continue
        if all(answer[0] != killed.get(actor) for actor, answer in zip(actors, answers, strict=True)):
            return answers
    return None
