"""Replicas as Ray actors; ``deploy`` returns the picklable ``LLMEndpoint`` agents receive.

``deploy(name, spec, base_dir=...)`` starts ``spec.replicas`` actors (``LLMReplica``), each hosting a
grpc.aio server with the backend inside the actor's event loop, bound to the node's IP (127.0.0.1
on a one-node local cluster), on a free port. Actors are named (``matrix-hpc/llm/<name>/<uid>/<i>``)
so clients can find a restarted replica (Ray restarts a dead actor up to ``max_restarts`` times; a
restarted actor starts its server again on first contact).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from matrix_hpc.services.auth import TLSPair
from matrix_hpc.services.llm.endpoint import LLMEndpoint, ReplicaRef, keep_handles
from matrix_hpc.services.llm.errors import ServiceError
from matrix_hpc.services.llm.spec import LLMSpec

log = logging.getLogger("matrix_hpc.llm")


class LLMReplica:
    """One replica: backend + gRPC server, started on first ``address()`` call (also after a restart)."""

    def __init__(self, name: str, spec: dict[str, Any], base_dir: str | None, local: bool,
                 secret: str | None = None, tls: TLSPair | None = None):
        self.name = name
        self.secret = secret
        self.tls = tls
        self.spec = LLMSpec.model_validate(spec)
        self.base_dir = base_dir
        self.local = local
        os.environ.update(self.spec.env)
        self._server = None
        self._watchdog: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None

    def _host(self) -> str:
        import ray

        ip = ray.util.get_node_ip_address()
        if ip.startswith("127.") or os.environ.get("MATRIX_HPC_CLUSTER"):  # set by the Slurm launcher
            return ip
        return "127.0.0.1" if self.local else ip

    async def address(self) -> str:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._server is None:
                from matrix_hpc.services.llm.server import serve

                logging.basicConfig(level=logging.INFO)
                self._server = await serve(self.spec, self.name, host=self._host(), port=0,
                                           base_dir=self.base_dir, secret=self.secret, tls=self.tls)
                self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_dead())
            return self._server.address

    async def _exit_when_dead(self) -> None:
        """A dead engine does not come back: once the server reports NOT_SERVING (and in-flight
        requests got UNAVAILABLE), end this process so that Ray restarts the replica."""
        while self._server is not None and self._server.healthy:
            await asyncio.sleep(1.0)
        if self._server is None or self.spec.max_restarts == 0:
            return
        await asyncio.sleep(2.0)
        log.error("LLM %r replica at %s: engine dead, exiting for Ray to restart it", self.name, self._server.address)
        os._exit(1)

    async def healthy(self) -> bool:
        return self._server is not None and self._server.healthy

    async def reset_prefix_cache(self) -> bool:
        """Reached through the Ray cluster only (a run's Ray needs its token), never over gRPC."""
        return self._server is not None and await self._server.reset_prefix_cache()

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace=1.0)


def _root_cause(e: BaseException) -> str:
    text = str(e)
    # RayTaskError text ends with the original exception's "Type: message" line
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else repr(e)


def deploy(name: str, spec: LLMSpec, *, base_dir: Path | str | None = None, secret: str | None = None,
           tls: TLSPair | None = None) -> LLMEndpoint:
    """Start ``spec.replicas`` replicas as Ray actors and wait until each serves; needs ``ray.init()``.
    With ``secret`` (the run's), the replicas refuse every call that does not carry it; with ``tls``
    (the run's certificate and key), they serve over TLS."""
    import ray

    if not ray.is_initialized():
        raise ServiceError(f"LLM {name!r}: call ray.init() before deploy()")
    if isinstance(spec, dict):
        spec = LLMSpec.model_validate(spec)
    base = str(Path(base_dir).resolve()) if base_dir is not None else None
    spec.resolve_model(base)  # fail early, on the driver, with a clear message
    local = sum(1 for n in ray.nodes() if n.get("Alive")) == 1
    namespace = ray.get_runtime_context().namespace
    uid = uuid.uuid4().hex[:8]
    actor_cls = ray.remote(LLMReplica)
    names = [f"matrix-hpc/llm/{name}/{uid}/{i}" for i in range(spec.replicas)]
    actors = [
        actor_cls.options(
            name=n,
            namespace=namespace,
            num_cpus=spec.ray_cpus(),
            num_gpus=spec.gpus_per_replica,
            max_restarts=spec.max_restarts,
            max_concurrency=10_000,
        ).remote(name, spec.model_dump(), base, local, secret, tls)
        for n in names
    ]
    t0 = time.monotonic()
    try:
        addresses = ray.get([a.address.remote() for a in actors], timeout=spec.start_timeout_s)
    except BaseException as e:
        for a in actors:
            ray.kill(a, no_restart=True)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            raise ServiceError(
                f"LLM {name!r}: replicas not serving after {spec.start_timeout_s:.0f}s "
                "(start_timeout_s); are there enough CPUs/GPUs in the Ray cluster?"
            ) from None
        if isinstance(e, ray.exceptions.RayError):
            raise ServiceError(
                f"LLM {name!r} ({spec.backend}, {spec.model}) failed to start: {_root_cause(e)}"
            ) from None
        raise
    log.info("LLM %r: %d replica(s) serving in %.1fs: %s", name, len(actors), time.monotonic() - t0, addresses)
    endpoint = LLMEndpoint(
        name=name,
        spec=spec,
        namespace=namespace,
        replicas=[ReplicaRef(a, n) for a, n in zip(addresses, names, strict=True)],
        secret=secret,
        tls_cert=tls.cert if tls else None,
    )
    keep_handles(endpoint.uid, actors)
    return endpoint
