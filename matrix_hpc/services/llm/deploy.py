"""Replicas as Ray actors (the service core's ``ServiceReplica``); ``deploy`` returns the picklable
``LLMEndpoint`` agents receive.

``deploy(name, spec, base_dir=...)`` starts ``spec.replicas`` actors (``LLMReplica``), each hosting a
grpc.aio server with the backend inside the actor's event loop: on a Unix socket in an owner-only
folder on one machine, on the node's address over TLS on a cluster (``matrix_hpc.services.core``).
Ray restarts a dead replica up to ``max_restarts`` times; a replica whose engine died ends its
process for that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matrix_hpc.paths import state_dir
from matrix_hpc.services.auth import TLSPair
from matrix_hpc.services.core.deploy import ServiceReplica, start_options, start_replicas
from matrix_hpc.services.llm.endpoint import LLMEndpoint
from matrix_hpc.services.llm.errors import ServiceError
from matrix_hpc.services.llm.spec import LLMSpec
from matrix_hpc.services.placement import PlacementError, replica_strategies


class LLMReplica(ServiceReplica):
    """One replica: backend + gRPC server, started when the actor is created (also after a restart)."""

    def __init__(self, name: str, spec: dict[str, Any], base_dir: str | None, *, socket_path: str | None = None,
                 secret: str | None = None, tls: TLSPair | None = None):
        self.spec = LLMSpec.model_validate(spec)
        self.base_dir = base_dir
        self.exit_when_dead = self.spec.max_restarts > 0
        if self.spec.backend == "vllm":  # vLLM's own cache is per user: never in the shared install
            os.environ.setdefault("VLLM_CACHE_ROOT", str(state_dir() / "vllm"))
        os.environ.update(self.spec.env)
        super().__init__(name, socket_path, secret, tls)

    async def make_server(self):
        from matrix_hpc.services.llm.backends import make_backend
        from matrix_hpc.services.llm.server import LLMServer

        return LLMServer(make_backend(self.spec, base_dir=self.base_dir), self.spec, self.name)

    async def reset_prefix_cache(self) -> bool:
        """Reached through the Ray cluster only (a run's Ray needs its token), never over gRPC."""
        return self.server is not None and await self.server.reset_prefix_cache()


def deploy(name: str, spec: LLMSpec, *, base_dir: Path | str | None = None, secret: str | None = None,
           tls: TLSPair | None = None, socket_dir: Path | str | None = None) -> LLMEndpoint:
    """Start ``spec.replicas`` replicas as Ray actors and wait until each serves; needs ``ray.init()``.
    With ``secret`` (the run's), the replicas refuse every call that does not carry it; with ``tls``
    (the run's certificate and key), they serve over TLS. On one machine their sockets go in
    ``socket_dir`` (owner-only; a private temporary folder by default)."""
    import ray

    if not ray.is_initialized():
        raise ServiceError(f"LLM {name!r}: call ray.init() before deploy()")
    if isinstance(spec, dict):
        spec = LLMSpec.model_validate(spec)
    base = str(Path(base_dir).resolve()) if base_dir is not None else None
    spec.resolve_model(base)  # fail early, on the driver, with a clear message
    try:  # spread over the nodes: one per gpus_per_replica GPUs of each node, round-robin
        strategies = replica_strategies(spec.replicas, spec.gpus_per_replica)
    except PlacementError as e:
        raise ServiceError(f"LLM {name!r}: {e}") from None
    placements = [(start_options(num_cpus=spec.ray_cpus(), num_gpus=spec.gpus_per_replica,
                                 max_restarts=spec.max_restarts, max_concurrency=10_000, scheduling_strategy=strategy),
                   (spec.model_dump(), base)) for strategy in strategies]
    deployed = start_replicas(
        "llm", name, LLMReplica, placements,
        secret=secret, tls=tls, socket_dir=socket_dir, timeout_s=spec.start_timeout_s,
        error=lambda msg: ServiceError(f"LLM {name!r} ({spec.backend}, {spec.model}): {msg}"), what=f"LLM {name!r}")
    return LLMEndpoint(name=name, spec=spec, replicas=deployed.replicas, namespace=deployed.namespace,
                       uid=deployed.uid, secret=secret, tls_cert=tls.cert if tls else None,
                       socket_dir=deployed.socket_dir)
