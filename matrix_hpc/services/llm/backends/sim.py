"""``sim``: a simulated inference engine, for measuring the runtime at scales no machine here can serve.

Not a model. It schedules requests the way vLLM's continuous batching does (a waiting queue, a
running batch of at most ``max_num_seqs`` sequences, whole-prompt prefills, one token per running
sequence per step, a KV cache of ``kv_cache_tokens`` that preempts the newest sequence when full)
and makes each engine step last what the cost model says:

    step time = step_s + prefill_token_s * prompt tokens prefilled in the step
                + decode_seq_s * sequences decoding + kv_token_s * context tokens they attend to
                + structured_seq_s * those of them under guided decoding (a schema, choice, tool call)

times ``time_scale`` (below 1 runs faster than the modelled hardware). Reply lengths are drawn per
request (seeded by the spec's seed, the request's seed and the prompt, so runs repeat) and capped by
``max_tokens``. Replies follow JSON schemas, choices and tool calls well enough for jobs to run:
a JSON schema gets its smallest valid instance, a choice one of its options, a forced tool call the
smallest valid arguments; free text is made of the words ``sim0 sim1 ...`` so nobody mistakes it
for a model's. ``stats()`` says ``simulated: 1`` with the engine's steps and batch occupancy.

With ``max_batched_tokens`` a step computes at most that many tokens (one per decoding sequence,
then whole prompts while they fit), as vLLM's scheduler does without chunked prefill. With
``replay`` (a file a real engine's service wrote with ``record``, backends/replay.py) a recorded
request gets its recorded reply, prompt tokens and prefix-cache hits (only the others are
prefilled): the recorded run's workload, timed by the cost model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrix_hpc.services.llm.backends.base import Backend, GenRequest, StreamEvent
from matrix_hpc.services.llm.backends.replay import Trace
from matrix_hpc.services.llm.errors import InvalidArgument
from matrix_hpc.services.llm.results import ChatResult, Choice, Timing, ToolCall, Usage
from matrix_hpc.services.llm.spec import LLMSpec, SimSpec
from matrix_hpc.services.llm.tools import new_call_id

_CHARS_PER_TOKEN = 4  # how prompt text becomes a token count


@dataclass
class _Seq:
    """One sequence (one choice of one request) inside the simulated engine."""

    prompt_tokens: int
    target_tokens: int
    out: asyncio.Queue
    cached: int = 0  # prompt tokens the engine's prefix cache serves (replay only)
    guided: bool = False  # its tokens are held to a grammar (JSON schema, choice, forced tool call)
    generated: int = 0
    prefilled: bool = False

    @property
    def to_prefill(self) -> int:
        return self.context if self.prefilled else self.prompt_tokens - self.cached

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass
class _Clock:
    """Engine statistics in modelled seconds (independent of time_scale)."""

    steps: int = 0
    busy_s: float = 0.0
    batch_sum: int = 0
    max_batch: int = 0
    attended: int = 0
    guided_sum: int = 0
    prompt_tokens: int = 0  # of each request, once, as vLLM counts them
    cached_tokens: int = 0  # of those, served by the prefix cache (replay only)
    prefilled_tokens: int = 0  # computed: prompts less cache hits, and preempted contexts again
    generation_tokens: int = 0
    preemptions: int = 0
    replayed: int = 0
    replay_misses: int = 0


class SimBackend(Backend):
    name = "sim"

    def __init__(self, spec: LLMSpec, *, replay: Path | None = None):
        self.cfg: SimSpec = spec.sim
        self.max_model_len = self.cfg.max_model_len
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._kv_used = 0
        self._clock = _Clock()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._trace = Trace(replay) if replay is not None else None

    async def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._engine_loop())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    def healthy(self) -> bool:
        return self._loop_task is None or not self._loop_task.done()

    def stats(self) -> dict[str, int]:
        c = self._clock
        return {
            "simulated": 1,
            "steps": c.steps,
            "max_batch": c.max_batch,
            "batch_sum": c.batch_sum,
            "busy_ms": int(c.busy_s * 1000),
            "prompt_tokens": c.prompt_tokens,
            "prefix_cache_queries": c.prompt_tokens,
            "prefix_cache_hits": c.cached_tokens,
            "prefilled_tokens": c.prefilled_tokens,
            "generation_tokens": c.generation_tokens,
            "attended_tokens": c.attended,
            "guided_sum": c.guided_sum,
            "preemptions": c.preemptions,
            "replayed": c.replayed,
            "replay_misses": c.replay_misses,
        }

    # --- the engine -------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        start = time.monotonic()
        modelled = 0.0  # wall time the steps so far should have taken (scaled)
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
                start, modelled = time.monotonic(), 0.0
            modelled += self._step() * self.cfg.time_scale
            delay = start + modelled - time.monotonic()
            await asyncio.sleep(max(delay, 0))  # sleeps until the step's end, without drift

    def _step(self) -> float:
        """Admit, prefill and decode one step; return its modelled duration in seconds."""
        cfg, c = self.cfg, self._clock
        prefill = 0
        budget = (cfg.max_batched_tokens or math.inf) - len(self._running)
        while self._waiting and len(self._running) < cfg.max_num_seqs:
            seq = self._waiting[0]
            if self._kv_used + seq.context + 1 > cfg.kv_cache_tokens and self._running:
                break
            if prefill + seq.to_prefill > budget and (prefill or self._running):
                break
            self._waiting.popleft()
            self._running.append(seq)
            self._kv_used += seq.context
            if not seq.prefilled:
                c.prompt_tokens += seq.prompt_tokens
                c.cached_tokens += seq.cached
            prefill += seq.to_prefill  # a preempted sequence recomputes its whole context
            seq.prefilled = True
        decoding = len(self._running)
        attended = sum(s.context for s in self._running)
        guided = sum(s.guided for s in self._running)
        finished = False
        for seq in self._running:
            seq.generated += 1
            self._kv_used += 1
            seq.out.put_nowait(seq.generated)
            if seq.generated >= seq.target_tokens:
                self._kv_used -= seq.context
                seq.out.put_nowait(None)
                finished = True
        if finished:  # one pass, not list.remove per sequence (quadratic with 100,000 running)
            self._running = [s for s in self._running if s.generated < s.target_tokens]
        while self._kv_used > cfg.kv_cache_tokens and len(self._running) > 1:
            victim = self._running.pop()  # the newest, as vLLM's recompute preemption does
            self._kv_used -= victim.context
            self._waiting.appendleft(victim)
            c.preemptions += 1
        duration = (cfg.step_s + cfg.prefill_token_s * prefill + cfg.decode_seq_s * decoding
                    + cfg.kv_token_s * attended + cfg.structured_seq_s * guided)
        c.steps += 1
        c.busy_s += duration
        c.batch_sum += decoding
        c.attended += attended
        c.guided_sum += guided
        c.max_batch = max(c.max_batch, decoding)
        c.prefilled_tokens += prefill
        c.generation_tokens += decoding
        return duration

    def _submit(self, prompt_tokens: int, target: int, cached: int = 0, guided: bool = False) -> _Seq:
        seq = _Seq(prompt_tokens, max(target, 1), asyncio.Queue(), min(cached, prompt_tokens - 1), guided)
        self._waiting.append(seq)
        self._wake.set()
        return seq

    # --- requests ---------------------------------------------------------------------------

    def _prompt_text(self, req: GenRequest) -> str:
        if req.messages is not None:
            return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in req.messages)
        return req.prompt or ""

    def _rng(self, req: GenRequest, index: int) -> random.Random:
        key = f"{self.cfg.seed}|{req.sampling.get('seed')}|{index}|{self._prompt_text(req)}".encode()
        return random.Random(hashlib.blake2b(key, digest_size=8).digest())

    def _plan(self, req: GenRequest, index: int) -> tuple[str, list[ToolCall], str, int]:
        """(text, tool calls, finish reason, tokens) of one choice, decided before it is 'generated'."""
        rng = self._rng(req, index)
        max_tokens = int(req.sampling.get("max_tokens") or self.max_model_len)
        if req.tools and req.tool_choice != "none":
            forced = req.tool_choice not in ("auto",)
            if forced or rng.random() < self.cfg.tool_call_p:
                tools = req.tools if req.tool_choice in ("auto", "required") else [
                    t for t in req.tools if t["name"] == req.tool_choice]
                tool = tools[rng.randrange(len(tools))]
                args = json.dumps(smallest_instance(tool.get("parameters") or {}))
                return "", [ToolCall(new_call_id(), tool["name"], args)], "tool_calls", _tokens(args) + 4
        if req.structured:
            text = _structured_text(req.structured, rng)
            return text, [], "stop", _tokens(text)
        wanted = self.cfg.output_tokens.draw(rng)
        n = min(wanted, max_tokens)
        return " ".join(f"sim{i}" for i in range(n)), [], "length" if wanted > max_tokens else "stop", n

    def _replayed(self, req: GenRequest) -> tuple[int, int, list] | None:
        """(prompt tokens, cached ones, plans) as recorded, or None (no trace, or not in it)."""
        if self._trace is None:
            return None
        recorded = self._trace.take(req)
        if recorded is None:
            self._clock.replay_misses += 1
            return None
        self._clock.replayed += 1
        plans = [(c.text, c.tool_calls, c.finish_reason, c.completion_tokens) for c in recorded.choices]
        return recorded.prompt_tokens, recorded.cached_prompt_tokens, plans

    def _check(self, req: GenRequest) -> int:
        prompt_tokens = max(1, _tokens(self._prompt_text(req)))
        if prompt_tokens >= self.max_model_len:
            raise InvalidArgument(
                f"prompt is {prompt_tokens} tokens, longer than the context of {self.max_model_len} tokens"
            )
        return prompt_tokens

    async def generate(self, req: GenRequest) -> ChatResult:
        final = None
        async for event in self.stream(req):
            final = event
        return final

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamEvent | ChatResult]:
        t0 = time.perf_counter()
        prompt_tokens, cached, plans = self._replayed(req) or (self._check(req), 0, [
            self._plan(req, i) for i in range(req.n)])
        guided = bool(req.structured) or req.forces_tool_call
        seqs = [self._submit(prompt_tokens, tokens, cached, guided) for _, _, _, tokens in plans]
        first = 0.0
        choices = []
        for i, (seq, (text, calls, finish, _)) in enumerate(zip(seqs, plans, strict=True)):
            words = text.split(" ") if text else []
            sent = 0
            while (produced := await seq.out.get()) is not None:
                first = first or time.perf_counter() - t0
                upto = len(words) * produced // seq.target_tokens
                if upto > sent:
                    yield StreamEvent(i, (" " if sent else "") + " ".join(words[sent:upto]))
                    sent = upto
            yield StreamEvent(i, "", finish)
            choices.append(Choice(index=i, text=text, finish_reason=finish, tool_calls=calls,
                                  completion_tokens=seq.target_tokens))
        gen = sum(c.completion_tokens for c in choices)
        total = time.perf_counter() - t0
        yield ChatResult(choices=choices, usage=Usage(prompt_tokens, gen, prompt_tokens + gen, seqs[0].cached),
                         timing=Timing(0.0, first or total, total))


def cost_terms(spec: LLMSpec, seqs: list[tuple[int, int, int, bool]]) -> dict[str, int]:
    """What the cost model's terms sum to when ``seqs`` (prompt tokens, cached ones, tokens to
    generate, guided) all arrive at once: the engine's scheduling without its clock. Each term's
    count times its parameter is the modelled time (``steps`` x step_s, ``prefilled_tokens`` x
    prefill_token_s, ``batch_sum`` x decode_seq_s, ``attended_tokens`` x kv_token_s, ``guided_sum``
    x structured_seq_s)."""
    sim = SimBackend(spec)
    for prompt, cached, tokens, guided in seqs:
        sim._submit(prompt, tokens, cached, guided)
    while sim._waiting or sim._running:
        sim._step()
    return sim.stats()


def _tokens(text: str) -> int:
    return math.ceil(len(text) / _CHARS_PER_TOKEN)


def _structured_text(structured: dict[str, Any], rng: random.Random) -> str:
    if "choice" in structured:
        options = structured["choice"]
        return options[rng.randrange(len(options))]
    if "json" in structured:
        return json.dumps(smallest_instance(structured["json"]))
    if structured.get("json_object"):
        return "{}"
    raise InvalidArgument("the sim backend cannot follow a regex (use json, choice or json_object)")


def smallest_instance(schema: dict[str, Any]) -> Any:
    """The smallest value a JSON schema accepts (enough for the schemas jobs use)."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return smallest_instance(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        required = schema.get("required", [])
        props = schema.get("properties", {})
        return {name: smallest_instance(props.get(name, {})) for name in required}
    if kind == "array":
        return [smallest_instance(schema.get("items", {})) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "s" * schema.get("minLength", 0)
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return None
