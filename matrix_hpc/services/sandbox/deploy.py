"""Run the sandbox service inside a Ray cluster: one replica actor per node, each hosting a gRPC
server (the service core's ``ServiceReplica``: a Unix socket in an owner-only folder on one
machine, the node's address over TLS on a cluster; Ray restarts a replica that died)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from matrix_hpc.paths import CacheUnreadable, check_cache_readable
from matrix_hpc.services.auth import TLSPair
from matrix_hpc.services.core.deploy import ServiceReplica, start_options, start_replicas
from matrix_hpc.services.core.endpoint import ServiceEndpoint

from .client import SandboxClient, release
from .image import ImageError, describe_image, image_is_named, resolve_image
from .spec import SandboxSpec
from .wire import ServiceError

REPLICA_RESTARTS = 100  # a replica that dies (killed, OOM) is restarted by Ray


class SandboxReplica(ServiceReplica):
    """Ray actor body (wrapped with ray.remote in ``deploy``): a SandboxServer on this node."""

    def __init__(self, name: str, spec_json: str, node: str, *, socket_path: str | None = None,
                 secret: str | None = None, tls: TLSPair | None = None) -> None:
        self.spec = SandboxSpec.model_validate_json(spec_json)
        self.node = node
        super().__init__(name, socket_path, secret, tls)

    async def make_server(self):
        from .server import SandboxServer

        return SandboxServer(self.spec, node=self.node)


@dataclass
class SandboxEndpoint(ServiceEndpoint):
    """Picklable handle on a deployed sandbox service (sent to every agent actor)."""

    default_wall_s: float = 30.0

    def client(self, key: str | None = None) -> SandboxClient:
        """An async client; its sessions are owned by ``key`` (the task id)."""
        return SandboxClient(self, key=key, name=self.name, default_wall_s=self.default_wall_s)

    async def release(self, owners: list[str]) -> int:
        """Close every session owned by these tasks (and kill their running one-shot sandboxes)."""
        return await release(self, list(owners))


def describe_source(spec: SandboxSpec, base_dir: str | Path | None = None) -> str:
    """What the sandboxes of ``spec`` run on (the runtime and where its root comes from), for the
    start-up line; "" when there is nothing to run on (``deploy`` then says why)."""
    try:
        image = resolve_image(spec.image, base_dir=Path(base_dir) if base_dir else None, runtime=spec.runtime,
                              fallback=spec.host_fallback)
    except ImageError:
        return ""
    return f"{spec.runtime}, {describe_image(spec.image, image)}"


def check_ready(spec: SandboxSpec, base_dir: str | Path | None = None, *, local: bool = True) -> None:
    """Raise ServiceError (one line, with the fix) if this user has nothing to run sandboxes on: an
    unreadable cache, an image that is not there (and no fallback applies), or (``local``: on this
    machine) no runtime binary. Checked in a second, before Ray starts."""
    if image_is_named(spec.image):
        try:
            check_cache_readable()
        except CacheUnreadable as e:
            raise ServiceError(str(e)) from None
    try:
        resolve_image(spec.image, base_dir=Path(base_dir) if base_dir else None, runtime=spec.runtime,
                      fallback=spec.host_fallback)
    except ImageError as e:
        raise ServiceError(str(e)) from None
    binary = spec.bwrap if spec.runtime == "bwrap" else spec.apptainer
    if local and shutil.which(binary) is None:
        package = "bubblewrap" if spec.runtime == "bwrap" else "apptainer"
        raise ServiceError(f"the {spec.runtime} runtime needs `{binary}`, which is not on PATH here: install "
                           f"{package} (apt-get install {package}, or `make system`)")


def deploy(name: str, spec: SandboxSpec | dict, *, base_dir: str | Path | None = None,
           timeout_s: float = 120.0, secret: str | None = None, tls: TLSPair | None = None,
           socket_dir: str | Path | None = None) -> SandboxEndpoint:
    """Start one replica per node (or ``spec.nodes`` of them), wait until they serve, return the endpoint.
    With ``secret`` (the run's), the replicas refuse every call that does not carry it; with ``tls``
    (the run's certificate and key), they serve over TLS. On one machine their sockets go in
    ``socket_dir`` (owner-only; a private temporary folder by default).

    Call after ``ray.init()``. Raises ServiceError with a clear message when it cannot start.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not isinstance(spec, SandboxSpec):
        spec = SandboxSpec.model_validate(spec)
    try:
        image = resolve_image(spec.image, base_dir=Path(base_dir) if base_dir else None, runtime=spec.runtime,
                              fallback=spec.host_fallback)
    except ImageError as e:
        raise ServiceError(f"sandbox {name!r}: {e}") from e
    # Replicas get an absolute image path (a path on the shared filesystem on clusters).
    spec = spec.model_copy(update={"image": str(image)})
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        raise ServiceError(f"sandbox {name!r}: no alive Ray node")
    nodes = nodes[: spec.nodes] if spec.nodes else nodes
    placements = [(start_options(num_cpus=spec.num_cpus, max_restarts=REPLICA_RESTARTS,
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)),
                   (spec.model_dump_json(), n["NodeManagerAddress"])) for n in nodes]
    deployed = start_replicas("sandbox", name, SandboxReplica, placements, secret=secret, tls=tls,
                              socket_dir=socket_dir, timeout_s=timeout_s,
                              error=lambda msg: ServiceError(f"sandbox {name!r}: {msg}"))
    return SandboxEndpoint(name, deployed.replicas, deployed.namespace, deployed.uid, secret=secret,
                           tls_cert=tls.cert if tls else None, socket_dir=deployed.socket_dir,
                           default_wall_s=spec.limits.wall_time_s)
