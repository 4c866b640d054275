"""Replicas as Ray actors, the same way for every service: placed, bound, restarted, stopped.

A service subclasses ``ServiceReplica`` (the actor body) with ``make_server()``, and calls
``start_replicas`` from its ``deploy``. Each replica:

- is a named Ray actor (``matrix-hpc/<kind>/<name>/<uid>/<i>``), placed by the options the service
  gives (CPUs, GPUs, a node), restarted by Ray up to ``max_restarts`` times;
- listens on a Unix socket in an owner-only folder on one machine (the same path again after a
  restart), or on its node's address and a port the kernel picks on a cluster, over TLS with the
  run's certificate (clients find a restarted replica's new port by asking its actor);
- starts its server as soon as it is created (also after a restart: nobody else asks) and answers
  ``address()`` once it serves; a server that reports itself dead for good (an engine that died)
  ends the process so that Ray restarts it;
- is stopped with ``stop()`` then killed by the endpoint's ``shutdown()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from matrix_hpc.services.auth import TLSPair
from matrix_hpc.services.core.endpoint import ReplicaRef, keep_handles
from matrix_hpc.services.core.listen import UNIX, node_address, on_cluster, socket_folder

log = logging.getLogger("matrix_hpc.services")

_DEAD_CHECK_S = 1.0


class HostedServer(Protocol):
    """What a replica hosts: a service's server object."""

    async def serve_at(self, address: str, *, secret: str | None, tls: TLSPair | None) -> str: ...

    @property
    def healthy(self) -> bool: ...

    async def stop(self) -> None: ...


class ServiceReplica:
    """Ray actor body of one replica (a service subclasses it and defines ``make_server``)."""

    exit_when_dead = False  # end the process once the server reports itself dead (Ray restarts it)

    def __init__(self, name: str, socket_path: str | None, secret: str | None, tls: TLSPair | None) -> None:
        import ray

        logging.basicConfig(level=logging.INFO)
        self.name = name
        self.socket_path = socket_path
        self.secret, self.tls = secret, tls  # actor arguments: a restarted replica has them again
        self.server: HostedServer | None = None
        self._lock: asyncio.Lock | None = None
        self._failed: BaseException | None = None
        self._watchdog: asyncio.Task | None = None
        ray.get_runtime_context().current_actor.address.remote()  # serve now, also after a restart

    async def make_server(self) -> HostedServer:
        raise NotImplementedError

    def _listen_address(self) -> str:
        return UNIX + self.socket_path if self.socket_path else node_address(0)

    async def address(self) -> str:
        """The address this replica serves at, once it serves (its server is started on the first call)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._failed is not None:
                raise self._failed
            if self.server is None:
                try:
                    server = await self.make_server()
                    self.address_now = await server.serve_at(self._listen_address(), secret=self.secret, tls=self.tls)
                except BaseException as e:
                    self._failed = e
                    raise
                self.server = server
                if self.exit_when_dead:
                    self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_dead())
            return self.address_now

    async def _exit_when_dead(self) -> None:
        while self.server is not None and self.server.healthy:
            await asyncio.sleep(_DEAD_CHECK_S)
        if self.server is None:
            return
        await asyncio.sleep(2.0)  # the calls in flight get their answer (UNAVAILABLE) first
        log.error("%s replica at %s: dead, exiting for Ray to restart it", self.name, self.address_now)
        os._exit(1)

    async def healthy(self) -> bool:
        return self.server is not None and self.server.healthy

    async def stop(self) -> None:
        """Stops the server; a start in progress (a restarted replica still loading) finishes first,
        so that what it started (an engine's processes, their shared memory) is stopped too."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._failed = self._failed or RuntimeError(f"{self.name} replica: stopped")  # no start after it
            if self.server is not None:
                server, self.server = self.server, None
                await server.stop()

    async def pid(self) -> int:
        return os.getpid()


@dataclass
class Deployed:
    replicas: list[ReplicaRef]
    namespace: str
    uid: str
    socket_dir: str | None  # a temporary folder made for the sockets (removed at shutdown)


def _root_cause(e: BaseException) -> str:
    """RayTaskError text ends with the original exception's "Type: message" line."""
    lines = [ln for ln in str(getattr(e, "cause", None) or e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else repr(e)


def start_replicas(kind: str, name: str, body: type[ServiceReplica], placements: list[tuple[dict, tuple]], *,
                   secret: str | None, tls: TLSPair | None, socket_dir: str | Path | None, timeout_s: float,
                   error: Callable[[str], Exception], what: str | None = None) -> Deployed:
    """Start one actor of ``body`` per ``(actor options, service arguments)`` in ``placements`` and
    wait until each serves. On one machine they listen on Unix sockets in ``socket_dir`` (owner-only;
    a private temporary folder if it is None or too long); on a cluster on their node's address.
    Raises ``error(message)`` when one fails to start or does not serve within ``timeout_s``; ``what``
    names the service in the log (default: ``kind 'name'``)."""
    import ray

    uid = uuid.uuid4().hex[:8]
    namespace = ray.get_runtime_context().namespace
    local = not on_cluster() and sum(1 for n in ray.nodes() if n.get("Alive")) == 1
    folder, temporary = (socket_folder(socket_dir, f"{kind}-{uid}-{len(placements)}.sock") if local
                         else (None, False))
    what = what or f"{kind} {name!r}"
    if not local and secret and tls is None:
        log.warning("%s: serving across nodes without TLS (MATRIX_HPC_TLS=0?): the run's secret crosses the "
                    "network in the clear, and a server in a replica's place cannot be told apart", what)
    names = [f"matrix-hpc/{kind}/{name}/{uid}/{i}" for i in range(len(placements))]
    remote = ray.remote(body)
    actors = []
    for i, (options, args) in enumerate(placements):
        sock = str(folder / f"{kind}-{uid}-{i}.sock") if folder else None
        actors.append(remote.options(name=names[i], namespace=namespace, **options).remote(
            name, *args, socket_path=sock, secret=secret, tls=tls))
    t0 = time.monotonic()
    try:
        addresses = ray.get([a.address.remote() for a in actors], timeout=timeout_s)
    except BaseException as e:
        for a in actors:
            ray.kill(a, no_restart=True)
        if temporary:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            raise error(f"replicas not serving after {timeout_s:.0f}s; are there enough CPUs/GPUs in the "
                        "Ray cluster?") from None
        if isinstance(e, ray.exceptions.RayError):
            raise error(f"failed to start: {_root_cause(e)}") from None
        raise
    log.info("%s: %d replica(s) serving in %.1fs: %s", what, len(actors), time.monotonic() - t0,
             ", ".join(addresses))
    keep_handles(uid, actors)
    return Deployed([ReplicaRef(a, n) for a, n in zip(addresses, names, strict=True)], namespace, uid,
                    str(folder) if temporary else None)


def start_options(**options: Any) -> dict:
    """Ray actor options of a replica: the service's placement, plus what every replica needs."""
    return {"max_concurrency": 1000, **options}
