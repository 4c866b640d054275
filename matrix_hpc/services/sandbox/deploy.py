"""Run the sandbox service inside a Ray cluster: one replica actor per node, each hosting a gRPC server."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matrix_hpc.services import auth
from matrix_hpc.services.auth import TLSPair

from .client import SandboxClient, release
from .image import ImageError, resolve_image
from .spec import SandboxSpec
from .wire import ServiceError

log = logging.getLogger("matrix_hpc.sandbox")

REPLICA_RESTARTS = 100  # a replica that dies (killed, OOM) is restarted by Ray, at the same address


class SandboxReplica:
    """Ray actor body (wrapped with ray.remote in ``deploy``): a SandboxServer on this node.

    It serves at a fixed ``host:port`` chosen at deploy time. Ray restarts a replica that died
    (``max_restarts``) with the same arguments; the new one starts serving at the same address when
    asked (by itself at start, and by ``SandboxEndpoint.heal``, which the driver calls every second),
    so the clients that hold that address find it again without a lookup.
    """

    def __init__(self, name: str, spec_json: str, node: str, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None, tls: TLSPair | None = None) -> None:
        import logging as _logging

        import ray

        _logging.basicConfig(level=_logging.INFO)
        self.name = name
        self.spec = SandboxSpec.model_validate_json(spec_json)
        self.node = node
        self.host, self.port = host, port
        self.secret, self.tls = secret, tls  # actor arguments: a restarted replica has them again
        self.server = None
        self._starting: asyncio.Lock | None = None
        if port:  # serve without waiting to be asked (after a restart nobody asks)
            ray.get_runtime_context().current_actor.start.remote(host)

    async def start(self, host: str) -> str:
        from .server import SandboxServer

        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.server is None:
                server = SandboxServer(self.spec, node=self.node)
                self.port = await server.start(host, self.port, secret=self.secret, tls=self.tls)
                self.server, self.host = server, host
        return f"{self.host}:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def pid(self) -> int:
        import os

        return os.getpid()


@dataclass
class SandboxEndpoint:
    """Picklable handle on a deployed sandbox service (sent to every agent actor)."""

    name: str
    addresses: list[str]
    default_wall_s: float = 30.0
    actors: list[Any] = field(default_factory=list, repr=False)
    secret: str | None = field(default=None, repr=False)  # the run's service secret; never shown
    tls_cert: bytes | None = field(default=None, repr=False)  # the run's certificate, when served over TLS

    def client(self, key: str | None = None) -> SandboxClient:
        """An async client; its sessions are owned by ``key`` (the task id)."""
        return SandboxClient(self.addresses, key=key, name=self.name, default_wall_s=self.default_wall_s,
                             secret=self.secret, tls_cert=self.tls_cert)

    def heal(self) -> None:
        """Ask every replica to serve (driver only, now and then): a no-op for one that serves;
        one that Ray restarted starts again at its address. Does not wait."""
        for actor, address in zip(self.actors, self.addresses, strict=False):
            actor.start.remote(address.rsplit(":", 1)[0])

    async def release(self, owners: list[str]) -> int:
        """Close every session owned by these tasks (and kill their running one-shot sandboxes)."""
        return await release(self.addresses, list(owners), secret=self.secret, tls_cert=self.tls_cert)

    def shutdown(self) -> None:
        """Stop every replica (driver only): running sandboxes are killed, sessions removed."""
        import ray

        refs = [a.stop.remote() for a in self.actors]
        try:
            ray.get(refs, timeout=30)
        except Exception as e:  # noqa: BLE001 - kill them anyway
            log.warning("sandbox %s: replicas did not stop cleanly: %s", self.name, e)
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []


def _bind_host(ip: str, n_nodes: int) -> str:
    # On a cluster (MATRIX_HPC_CLUSTER, set by the Slurm launcher) always the node's cluster address,
    # also with one node; loopback only for the single-machine default.
    if ip.startswith("127.") or os.environ.get("MATRIX_HPC_CLUSTER"):
        return ip
    return "127.0.0.1" if n_nodes == 1 else ip


def _free_port(host: str) -> int:
    """A port free on this node now (the replica binds it a moment later, and again after a restart)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deploy(name: str, spec: SandboxSpec | dict, *, base_dir: str | Path | None = None,
           timeout_s: float = 120.0, secret: str | None = None, tls: TLSPair | None = None) -> SandboxEndpoint:
    """Start one replica per node (or ``spec.nodes`` of them), wait until they serve, return the endpoint.
    With ``secret`` (the run's), the replicas refuse every call that does not carry it; with ``tls``
    (the run's certificate and key), they serve over TLS.

    Call after ``ray.init()``. Raises ServiceError with a clear message when it cannot start.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not isinstance(spec, SandboxSpec):
        spec = SandboxSpec.model_validate(spec)
    try:
        image = resolve_image(spec.image, base_dir=Path(base_dir) if base_dir else None)
    except ImageError as e:
        raise ServiceError(f"sandbox {name!r}: {e}") from e
    # Replicas get an absolute image path (a path on the shared filesystem on clusters).
    spec = spec.model_copy(update={"image": str(image)})
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        raise ServiceError(f"sandbox {name!r}: no alive Ray node")
    nodes = nodes[: spec.nodes] if spec.nodes else nodes
    remote = ray.remote(SandboxReplica)
    free_port = ray.remote(_free_port)
    actors, starts = [], []
    for n in nodes:
        host = _bind_host(n["NodeManagerAddress"], len(nodes))
        on_node = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        port = ray.get(free_port.options(num_cpus=0, scheduling_strategy=on_node).remote(host), timeout=timeout_s)
        a = remote.options(
            num_cpus=spec.num_cpus, max_concurrency=1000, max_restarts=REPLICA_RESTARTS, scheduling_strategy=on_node,
        ).remote(name, spec.model_dump_json(), n["NodeManagerAddress"], host, port, secret, tls)
        actors.append(a)
        starts.append(a.start.remote(host))
    t0 = time.monotonic()
    try:
        addresses = ray.get(starts, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - surface the replica's own error
        for a in actors:
            ray.kill(a)
        cause = getattr(e, "cause", None) or e
        raise ServiceError(f"sandbox {name!r}: a replica failed to start: {cause}") from e
    ep = SandboxEndpoint(name, list(addresses), spec.limits.wall_time_s, actors, secret=secret,
                         tls_cert=tls.cert if tls else None)
    try:
        _run_sync(_wait_healthy(ep.addresses, max(5.0, timeout_s - (time.monotonic() - t0)), ep.tls_cert))
    except Exception as e:
        ep.shutdown()
        raise ServiceError(f"sandbox {name!r}: replicas did not become healthy: {e}") from e
    log.info("sandbox %s: %d replica(s) at %s", name, len(addresses), ", ".join(addresses))
    return ep


def _run_sync(coro):
    """asyncio.run, also from a thread that already runs an event loop (then in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _wait_healthy(addresses: list[str], timeout: float, tls_cert: bytes | None) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for addr in addresses:
        async with auth.channel(addr, None, None, tls_cert) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="matrix_hpc.sandbox.v1.Sandbox"),
                timeout=timeout, wait_for_ready=True)
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                raise ServiceError(f"{addr} is not serving")
