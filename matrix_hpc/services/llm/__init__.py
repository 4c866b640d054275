"""The LLM service: gRPC-fronted vLLM (GPU or CPU), an OpenAI-compatible upstream, or a scripted
stand-in; replicas as Ray actors; load-balanced async clients.

Driver: ``endpoint = deploy(name, LLMSpec(...), base_dir=job_dir)`` after ``ray.init()``, then
``endpoint.shutdown()``. Agents: ``await endpoint.client(task_id).chat(messages, temperature=0.7)``.
"""

from __future__ import annotations

from matrix_hpc.services.llm.client import LLMClient
from matrix_hpc.services.llm.deploy import LLMReplica, deploy
from matrix_hpc.services.llm.endpoint import LLMEndpoint, ReplicaRef
from matrix_hpc.services.llm.errors import InvalidRequest, ServiceError
from matrix_hpc.services.llm.ready import check_ready
from matrix_hpc.services.llm.results import (
    ChatChunk,
    ChatResult,
    Choice,
    Timing,
    TokenLogprob,
    ToolCall,
    Usage,
)
from matrix_hpc.services.llm.spec import LatencySpec, LLMSpec, SamplingDefaults, ScriptedSpec

Endpoint = LLMEndpoint


__all__ = [
    "ChatChunk",
    "ChatResult",
    "Choice",
    "Endpoint",
    "InvalidRequest",
    "LLMClient",
    "LLMEndpoint",
    "LLMReplica",
    "LLMSpec",
    "LatencySpec",
    "ReplicaRef",
    "SamplingDefaults",
    "ScriptedSpec",
    "ServiceError",
    "Timing",
    "TokenLogprob",
    "ToolCall",
    "Usage",
    "check_ready",
    "deploy",
]
