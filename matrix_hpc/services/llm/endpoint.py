"""Where an LLM service is: the picklable ``LLMEndpoint`` sent to every agent, and its shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field

from matrix_hpc.services.core.endpoint import ReplicaRef, ServiceEndpoint, addresses_uid
from matrix_hpc.services.llm.client import LLMClient
from matrix_hpc.services.llm.spec import LLMSpec

__all__ = ["LLMEndpoint", "ReplicaRef"]


@dataclass
class LLMEndpoint(ServiceEndpoint):
    """Where an LLM service is; picklable, sent to every agent. ``client(key)`` to call it."""

    spec: LLMSpec = field(kw_only=True)

    @classmethod
    def from_addresses(
        cls,
        addresses: list[str],
        *,
        name: str = "llm",
        spec: LLMSpec | None = None,
        secret: str | None = None,
        tls_cert: bytes | None = None,
    ) -> LLMEndpoint:
        """An endpoint for servers started elsewhere (``matrix-hpc serve llm``; ``secret``: the one
        in its ``--secret-file``, see ``matrix_hpc.services.auth.read_secret_file``)."""
        return cls(name=name, spec=spec or LLMSpec(backend="scripted"), replicas=[ReplicaRef(a) for a in addresses],
                   secret=secret, tls_cert=tls_cert, uid=addresses_uid(addresses, secret, tls_cert) + name)

    def client(self, key: str | None = None) -> LLMClient:
        """An async client; ``key`` (the task id) keeps a task's turns on one replica."""
        return LLMClient(self, key)

    def reset_prefix_cache(self, timeout: float = 60.0) -> list[bool]:
        """Make every deployed replica forget its cached prompt prefixes (between benchmark phases
        that send identical prompts, say). Goes through the Ray cluster, not gRPC: only a process
        inside the run's Ray can do it. One bool per replica found: False where the backend has no
        prefix cache (scripted, openai) or a request still holds cache blocks (call it with nothing
        in flight)."""
        import ray

        if any(r.actor_name is None for r in self.replicas):
            raise ValueError(f"LLM {self.name!r}: reset_prefix_cache needs replicas started by deploy()")
        return list(ray.get([h.reset_prefix_cache.remote() for h in self.actors], timeout=timeout))
