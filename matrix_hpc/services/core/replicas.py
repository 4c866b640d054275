"""The client side of every service: one set of replicas per endpoint and event loop in a process.

``replica_set(endpoint, options)`` is shared by every client of that endpoint (a client per step is
cheap). It keeps one channel per replica, counts the calls each has outstanding, and picks one:
with a key, the replica that rendezvous hashing gives the key among the healthy ones (a task's
turns stay together); without, the one with the fewest outstanding calls. A process may keep at most
``calls_per_replica`` calls open to one replica; the others wait here for a turn (an open gRPC call
holds ~25 KiB on each side, so 100,000 waiting workflows must not each hold one). A replica that cannot
be reached is marked down and probed with the gRPC health service (200 ms, doubling to 5 s); a
Ray actor that Ray restarted is asked for its address again (a new port on a cluster, the same
socket on one machine), and the replica comes back once it answers SERVING.

Before any channel is made the address is checked (``listen.check_address``): a Unix socket must
sit in a folder of ours that no one else can enter. Over TCP, the run's certificate is the only
one trusted: a server that cannot prove it holds the run's key gets no call, so no secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from matrix_hpc.services import auth
from matrix_hpc.services.core.errors import ServiceError
from matrix_hpc.services.core.listen import check_address

log = logging.getLogger("matrix_hpc.services")

PROBE_MIN_S = 0.2
PROBE_MAX_S = 5.0
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 0),  # we retry ourselves, across replicas
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.use_local_subchannel_pool", 1),  # a channel's own connection: not stuck in another's backoff
]


class Endpoint(Protocol):
    """What the replica set needs of an endpoint (``core.endpoint.ServiceEndpoint``)."""

    name: str
    replicas: list
    namespace: str | None
    uid: str
    secret: str | None
    tls_cert: bytes | None


def channel(address: str, secret: str | None, tls_cert: bytes | None, max_message: int) -> grpc.aio.Channel:
    """A channel that sends ``secret`` on every call, after checking that ``address`` may have it
    (else ServiceError: UNAVAILABLE where the socket's folder is gone, PERMISSION_DENIED where it is
    not ours alone)."""
    try:
        check_address(address)
    except auth.CredentialError as e:
        raise ServiceError(str(e), "UNAVAILABLE" if "no such folder" in str(e) else "PERMISSION_DENIED") from None
    options = [*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", max_message),
               ("grpc.max_send_message_length", max_message)]
    return auth.channel(address, secret, options, tls_cert)


class Replica:
    """One replica as this process sees it: its channel, health and load."""

    def __init__(self, address: str, actor_name: str | None, owner: ReplicaSet):
        self.actor_name = actor_name
        self.owner = owner
        self.outstanding = 0
        self.healthy = True
        self.next_probe = 0.0
        self.probe_interval = PROBE_MIN_S
        self.probing = False
        self._turns = asyncio.Semaphore(owner.calls_per_replica) if owner.calls_per_replica else None
        self._stubs: dict[type, Any] = {}
        self.channel: grpc.aio.Channel | None = None
        self._connect(address)

    @property
    def ident(self) -> str:
        return self.actor_name or self.address

    def _connect(self, address: str) -> None:
        self.channel = channel(address, self.owner.secret, self.owner.tls_cert, self.owner.max_message)
        self.address = address
        self._stubs = {}

    def stub(self, cls: type) -> Any:
        """A stub of ``cls`` on this replica's current channel."""
        stub = self._stubs.get(cls)
        if stub is None:
            stub = self._stubs[cls] = cls(self.channel)
        return stub

    @contextlib.asynccontextmanager
    async def call_turn(self) -> AsyncIterator[None]:
        """Counts a call as outstanding on this replica while it waits for a turn and runs."""
        self.outstanding += 1
        try:
            if self._turns is None:
                yield
            else:
                async with self._turns:
                    yield
        finally:
            self.outstanding -= 1

    async def reconnect(self, address: str) -> None:
        old = self.channel
        self._connect(address)
        if old is not None:
            await old.close()


class ReplicaSet:
    """The replicas of one endpoint in this process and event loop."""

    def __init__(self, endpoint: Endpoint, max_message: int, calls_per_replica: int | None = None):
        self.name = endpoint.name
        self.calls_per_replica = calls_per_replica
        self.namespace = endpoint.namespace
        self.secret, self.tls_cert = endpoint.secret, endpoint.tls_cert
        self.max_message = max_message
        self.replicas = [Replica(r.address, r.actor_name, self) for r in endpoint.replicas]
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()

    # -- health ---------------------------------------------------------------------------------
    def mark_down(self, r: Replica) -> None:
        if r.healthy:
            r.healthy = False
            r.probe_interval = PROBE_MIN_S
            r.next_probe = time.monotonic() + PROBE_MIN_S

    def schedule_probes(self) -> None:
        now = time.monotonic()
        for r in self.replicas:
            if not r.healthy and not r.probing and now >= r.next_probe:
                r.probing = True
                t = asyncio.get_running_loop().create_task(self._probe(r))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    async def _probe(self, r: Replica) -> None:
        try:
            if await self._back(r):
                r.healthy = True
                self._changed.set()
            else:
                r.probe_interval = min(PROBE_MAX_S, r.probe_interval * 2)
                r.next_probe = time.monotonic() + r.probe_interval
        finally:
            r.probing = False

    async def _back(self, r: Replica) -> bool:
        """Whether ``r`` serves again: at its address, or where its (restarted) actor now says. The
        address is checked again first (its channel reconnects by itself)."""
        try:
            check_address(r.address)
            if await self._serving(r.stub(health_pb2_grpc.HealthStub), 1.0):
                return True
            address = await self._lookup_actor(r.actor_name) if r.actor_name else None
            if not address:
                return False
            if address != r.address:
                await r.reconnect(address)
        except (auth.CredentialError, ServiceError) as e:  # not an address to trust: probed again later
            log.warning("%s: replica %s: %s", self.name, r.ident, e)
            return False
        return await self._serving(r.stub(health_pb2_grpc.HealthStub), 2.0)

    @staticmethod
    async def _serving(health: health_pb2_grpc.HealthStub, timeout: float) -> bool:
        try:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    async def _lookup_actor(self, actor_name: str) -> str | None:
        """The current address of a (possibly restarted) replica actor, if Ray can tell; asking it
        starts its server if it is not serving yet."""
        try:
            import ray

            if not ray.is_initialized():
                return None
            handle = await asyncio.to_thread(ray.get_actor, actor_name, self.namespace)
            return await asyncio.wait_for(asyncio.wrap_future(handle.address.remote().future()), timeout=3.0)
        except Exception:  # noqa: BLE001 - dead for good, restarting, or no Ray here: probe again later
            return None

    # -- choice ---------------------------------------------------------------------------------
    def pick(self, key: str | None, avoid: set[str]) -> Replica | None:
        """A healthy replica (one not in ``avoid`` if there is one): the key's, or the least loaded."""
        self.schedule_probes()
        healthy = [r for r in self.replicas if r.healthy]
        candidates = [r for r in healthy if r.address not in avoid] or healthy
        if not candidates:
            return None
        if key is not None:
            return max(candidates, key=lambda r: _score(key, r.ident))
        least = min(r.outstanding for r in candidates)
        return random.choice([r for r in candidates if r.outstanding == least])

    async def acquire(self, key: str | None, avoid: set[str], deadline: float) -> Replica | None:
        """``pick``, waiting (until ``deadline``) for a replica to come back when none is healthy."""
        while True:
            r = self.pick(key, avoid)
            if r is not None:
                return r
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._changed.clear()
            try:  # wake up when a probe brings a replica back, or to schedule the next probes
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, PROBE_MIN_S))
            except TimeoutError:
                pass

    def failed(self, r: Replica, code: grpc.StatusCode) -> None:
        """After a call to ``r`` failed with ``code``: an unreachable replica is marked down."""
        if code == grpc.StatusCode.UNAVAILABLE:
            self.mark_down(r)


def _score(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")


_SETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ReplicaSet]] = weakref.WeakKeyDictionary()


def replica_set(endpoint: Endpoint, max_message: int = 64 * 1024 * 1024,
                calls_per_replica: int | None = None) -> ReplicaSet:
    """The replica set of ``endpoint`` for this process and running event loop (made on first use);
    ``calls_per_replica``: the calls open at once to one replica (None: no limit)."""
    sets = _SETS.setdefault(asyncio.get_running_loop(), {})
    found = sets.get(endpoint.uid)
    if found is None:
        found = sets[endpoint.uid] = ReplicaSet(endpoint, max_message, calls_per_replica)
    return found
