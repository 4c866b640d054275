"""Where an LLM service is: the picklable ``LLMEndpoint`` sent to every agent, and its shutdown."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from matrix_hpc.services.llm.client import LLMClient
from matrix_hpc.services.llm.spec import LLMSpec

# Ray kills a (non-detached) actor once no handle to it is left, names notwithstanding: the
# driver keeps the handles of the replicas it deployed here until ``shutdown()``.
_HANDLES: dict[str, list[Any]] = {}


def keep_handles(uid: str, actors: list[Any]) -> None:
    """Hold the deployed replicas' handles (alive) until the endpoint ``uid`` is shut down."""
    _HANDLES[uid] = actors


@dataclass(frozen=True)
class ReplicaRef:
    address: str  # host:port of its gRPC server
    actor_name: str | None = None  # Ray actor name (None for servers not started by deploy)


@dataclass
class LLMEndpoint:
    """Where an LLM service is; picklable, sent to every agent. ``client(key)`` to call it."""

    name: str
    spec: LLMSpec
    replicas: list[ReplicaRef]
    namespace: str | None = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    secret: str | None = field(default=None, repr=False)  # the run's service secret; never shown
    tls_cert: bytes | None = field(default=None, repr=False)  # the run's certificate, when served over TLS

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
                   secret=secret, tls_cert=tls_cert)

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def client(self, key: str | None = None) -> LLMClient:
        """An async client; ``key`` (the task id) keeps a task's turns on one replica."""
        return LLMClient(self, key)

    def _actors(self) -> list[Any]:
        """The replicas' Ray actors (deployed ones only)."""
        import ray

        handles = list(_HANDLES.get(self.uid, []))
        if not handles:  # another process (or a copy of the endpoint): find the actors by name
            for r in self.replicas:
                if r.actor_name is None:
                    continue
                try:
                    handles.append(ray.get_actor(r.actor_name, namespace=self.namespace))
                except ValueError:
                    continue  # already gone
        return handles

    def reset_prefix_cache(self, timeout: float = 60.0) -> list[bool]:
        """Make every deployed replica forget its cached prompt prefixes (between benchmark phases
        that send identical prompts, say). Goes through the Ray cluster, not gRPC: only a process
        inside the run's Ray can do it. One bool per replica found: False where the backend has no
        prefix cache (scripted, openai) or a request still holds cache blocks (call it with nothing
        in flight)."""
        import ray

        if any(r.actor_name is None for r in self.replicas):
            raise ValueError(f"LLM {self.name!r}: reset_prefix_cache needs replicas started by deploy()")
        return list(ray.get([h.reset_prefix_cache.remote() for h in self._actors()], timeout=timeout))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the replicas (driver only). Safe to call twice."""
        import ray

        if not ray.is_initialized():
            return
        handles = self._actors()
        refs = [h.stop.remote() for h in handles]
        try:  # graceful first: the vLLM engine stops its own subprocesses
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        except Exception:  # noqa: BLE001 - a dead actor; it is killed below anyway
            pass
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        _HANDLES.pop(self.uid, None)
