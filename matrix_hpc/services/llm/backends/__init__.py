"""Backends of the LLM service: ``vllm`` (in-process engine), ``openai`` (HTTP upstream) and
``scripted`` (a deterministic stand-in for tests and benchmarks only) and ``sim`` (a simulated
engine with a cost model, for measuring the runtime at scale; not a model)."""

from __future__ import annotations

from pathlib import Path

from matrix_hpc.services.llm.backends.base import Backend, GenRequest, StreamEvent
from matrix_hpc.services.llm.spec import LLMSpec

__all__ = ["Backend", "GenRequest", "StreamEvent", "make_backend"]


def make_backend(spec: LLMSpec, *, base_dir: Path | str | None = None) -> Backend:
    """The backend named by ``spec.backend`` (not started: ``await backend.start()``), recording its
    replies when ``spec.record`` says so."""
    backend = _backend(spec, base_dir)
    if spec.record is None:
        return backend
    from matrix_hpc.services.llm.backends.replay import Recorder

    return Recorder(backend, Path(base_dir or ".") / spec.record)


def _backend(spec: LLMSpec, base_dir: Path | str | None) -> Backend:
    if spec.backend == "scripted":
        from matrix_hpc.services.llm.backends.scripted import ScriptedBackend

        return ScriptedBackend(spec)
    if spec.backend == "openai":
        from matrix_hpc.services.llm.backends.openai import OpenAIBackend

        return OpenAIBackend(spec)
    if spec.backend == "sim":
        from matrix_hpc.services.llm.backends.sim import SimBackend

        replay = None if spec.sim.replay is None else Path(base_dir or ".") / spec.sim.replay
        return SimBackend(spec, replay=replay)
    if spec.backend == "vllm":
        from matrix_hpc.services.llm.backends.vllm import VLLMBackend

        return VLLMBackend(spec, model_path=spec.resolve_model(base_dir))
    raise ValueError(f"unknown backend {spec.backend!r}")
