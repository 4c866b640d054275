"""``scripted``: a deterministic stand-in for an LLM, for tests and benchmarks only.

It answers without a model: ``echo`` repeats the last user message (or the prompt), ``canned``
picks one of ``replies`` from a hash of the prompt, the seed and the choice index. Latency follows
``scripted.latency`` (seeded per request, so runs repeat). Tokens are whitespace-separated words.
Guided decoding is honoured only for ``choice`` (the first choice is returned); tool_choice
"required" or a tool name returns a call with empty arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator

from matrix_hpc.services.llm.backends.base import Backend, GenRequest, StreamEvent
from matrix_hpc.services.llm.errors import InvalidArgument
from matrix_hpc.services.llm.results import ChatResult, Choice, Timing, ToolCall, Usage
from matrix_hpc.services.llm.spec import LLMSpec
from matrix_hpc.services.llm.tools import new_call_id


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, spec: LLMSpec):
        self.cfg = spec.scripted
        self.max_model_len = self.cfg.max_model_len
        self._requests = 0
        self._prompt_tokens = 0
        self._gen_tokens = 0

    def _prompt_text(self, req: GenRequest) -> str:
        if req.messages is not None:
            return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in req.messages)
        return req.prompt or ""

    def _reply(self, req: GenRequest, index: int) -> tuple[str, list[ToolCall], str]:
        if req.forces_tool_call:
            tool = next(t for t in req.tools if req.tool_choice in ("required", t["name"]))
            return "", [ToolCall(new_call_id(), tool["name"], json.dumps({}))], "tool_calls"
        if req.structured and "choice" in req.structured:
            return req.structured["choice"][0], [], "stop"
        if self.cfg.mode == "echo":
            if req.messages is not None:
                users = [m for m in req.messages if m["role"] == "user"]
                text = (users[-1].get("content") or "") if users else ""
            else:
                text = req.prompt or ""
        else:
            key = f"{self._prompt_text(req)}|{req.sampling.get('seed')}|{index}".encode()
            h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
            text = self.cfg.replies[h % len(self.cfg.replies)]
        finish = "stop"
        for s in req.sampling.get("stop") or []:
            if s and s in text:
                text = text[: text.index(s)]
        max_tokens = req.sampling.get("max_tokens")
        words = text.split(" ")
        if max_tokens is not None and len(words) > max_tokens:
            text, finish = " ".join(words[:max_tokens]), "length"
        return text, [], finish

    def _delay(self, req: GenRequest, n_tokens: int) -> float:
        lat = self.cfg.latency
        if lat.dist == "fixed" or lat.mean_s <= 0:
            extra = lat.mean_s if lat.dist == "fixed" else 0.0
        else:
            rng = random.Random(f"{self.cfg.seed}|{req.request_id}")
            if lat.dist == "uniform":
                extra = rng.uniform(0, 2 * lat.mean_s)
            elif lat.dist == "exponential":
                extra = rng.expovariate(1 / lat.mean_s)
            else:
                import math

                mu = math.log(lat.mean_s) - lat.sigma**2 / 2
                extra = rng.lognormvariate(mu, lat.sigma)
        return lat.base_s + extra + lat.per_token_s * n_tokens

    def _check(self, req: GenRequest) -> int:
        prompt_tokens = len(self._prompt_text(req).split())
        if prompt_tokens >= self.max_model_len:
            raise InvalidArgument(
                f"prompt is {prompt_tokens} tokens, longer than the context of {self.max_model_len} tokens"
            )
        return prompt_tokens

    async def generate(self, req: GenRequest) -> ChatResult:
        t0 = time.perf_counter()
        prompt_tokens = self._check(req)
        choices = []
        for i in range(req.n):
            text, calls, finish = self._reply(req, i)
            ntok = len(text.split()) if text else 0
            choices.append(Choice(index=i, text=text, finish_reason=finish, tool_calls=calls, completion_tokens=ntok))
        gen = sum(c.completion_tokens for c in choices)
        delay = self._delay(req, max((c.completion_tokens for c in choices), default=0))
        if delay > 0:
            await asyncio.sleep(delay)
        self._account(prompt_tokens, gen)
        total = time.perf_counter() - t0
        return ChatResult(
            choices=choices,
            usage=Usage(prompt_tokens, gen, prompt_tokens + gen),
            timing=Timing(0.0, total, total),
        )

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamEvent | ChatResult]:
        t0 = time.perf_counter()
        prompt_tokens = self._check(req)
        choices = []
        first = 0.0
        base = self._delay(req, 0)
        if base > 0:
            await asyncio.sleep(base)
        for i in range(req.n):
            text, calls, finish = self._reply(req, i)
            words = text.split(" ") if text else []
            for j, w in enumerate(words):
                if self.cfg.latency.per_token_s > 0:
                    await asyncio.sleep(self.cfg.latency.per_token_s)
                first = first or time.perf_counter() - t0
                yield StreamEvent(i, w if j == 0 else " " + w)
            yield StreamEvent(i, "", finish)
            choices.append(
                Choice(index=i, text=text, finish_reason=finish, tool_calls=calls, completion_tokens=len(words))
            )
        gen = sum(c.completion_tokens for c in choices)
        self._account(prompt_tokens, gen)
        total = time.perf_counter() - t0
        yield ChatResult(
            choices=choices,
            usage=Usage(prompt_tokens, gen, prompt_tokens + gen),
            timing=Timing(0.0, first or total, total),
        )

    def _account(self, prompt_tokens: int, gen: int) -> None:
        self._requests += 1
        self._prompt_tokens += prompt_tokens
        self._gen_tokens += gen

    def stats(self) -> dict[str, int]:
        return {"prompt_tokens": self._prompt_tokens, "generation_tokens": self._gen_tokens}
