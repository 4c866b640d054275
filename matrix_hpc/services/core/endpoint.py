"""Where a deployed service is: the picklable part every service's endpoint shares.

An endpoint goes to every agent (Ray pickles it). It names the replicas (their address, and the
Ray actor behind each, by which a client finds a replica again after Ray restarted it) and carries
the run's secret and certificate (never shown in its ``repr``). The driver that deployed it also
holds the replicas' actor handles here, until ``shutdown()``: Ray kills a (non-detached) actor
once no handle to it is left.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("matrix_hpc.services")

_HANDLES: dict[str, list[Any]] = {}  # endpoint uid -> its replicas' actor handles (the deploying process)


def keep_handles(uid: str, actors: list[Any]) -> None:
    """Hold the deployed replicas' handles (alive) until the endpoint ``uid`` is shut down."""
    _HANDLES[uid] = actors


@dataclass(frozen=True)
class ReplicaRef:
    address: str  # host:port or unix:PATH of its gRPC server
    actor_name: str | None = None  # Ray actor name (None for servers not started by deploy)


def addresses_uid(addresses: list[str], secret: str | None, tls_cert: bytes | None) -> str:
    """A stable id for servers known only by address: clients made per call share their channels."""
    h = hashlib.blake2b(digest_size=16)
    for part in (*addresses, secret or "", (tls_cert or b"").decode(errors="replace")):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@dataclass
class ServiceEndpoint:
    """A deployed (or standalone) service: its replicas and the run's credentials."""

    name: str
    replicas: list[ReplicaRef]
    namespace: str | None = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    secret: str | None = field(default=None, repr=False)  # the run's service secret; never shown
    tls_cert: bytes | None = field(default=None, repr=False)  # the run's certificate, when served over TLS
    socket_dir: str | None = field(default=None, repr=False)  # a temporary folder deploy made; removed at shutdown

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    @property
    def actors(self) -> list[Any]:
        """The replicas' Ray actors (deployed ones only): the deploying process's handles, else found by name."""
        handles = list(_HANDLES.get(self.uid, []))
        if handles or all(r.actor_name is None for r in self.replicas):
            return handles
        import ray

        for r in self.replicas:
            if r.actor_name is not None:
                try:
                    handles.append(ray.get_actor(r.actor_name, namespace=self.namespace))
                except ValueError:
                    continue  # already gone
        return handles

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the replicas (driver only): gracefully first, then killed. Safe to call twice."""
        import ray

        if ray.is_initialized():
            handles = self.actors
            refs = [h.stop.remote() for h in handles]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=timeout)
            except Exception as e:  # noqa: BLE001 - a dead actor; it is killed below anyway
                log.warning("%s: replicas did not stop cleanly: %s", self.name, e)
            for h in handles:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone (or Ray shut down): nothing left to stop
                    pass
        _HANDLES.pop(self.uid, None)
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
