"""``openai``: forwards to an OpenAI-compatible HTTP endpoint (a vLLM or SGLang server, a hosted API).

The API key, if any, is read from the environment variable named by ``api_key_env`` (never from the
spec). Guided decoding: ``json_schema``/``json_object`` use the standard ``response_format``;
``regex`` and ``choice`` use the ``structured_outputs`` extension of vLLM servers.
Upstream errors map to gRPC codes: 400/404/422 -> INVALID_ARGUMENT, 429 -> RESOURCE_EXHAUSTED,
5xx and connection failures -> UNAVAILABLE.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from matrix_hpc.services.llm import tools as toolkit
from matrix_hpc.services.llm.backends.base import Backend, GenRequest, StreamEvent
from matrix_hpc.services.llm.errors import InvalidArgument, Overloaded, Unavailable
from matrix_hpc.services.llm.results import ChatResult, Choice, Timing, TokenLogprob, ToolCall, Usage
from matrix_hpc.services.llm.spec import LLMSpec


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, spec: LLMSpec):
        self.spec = spec
        self.base_url = (spec.base_url or "").rstrip("/")
        self.client: httpx.AsyncClient | None = None
        self._healthy = False
        self._prompt_tokens = 0
        self._gen_tokens = 0

    async def start(self) -> None:
        headers = {}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise RuntimeError(f"environment variable {self.spec.api_key_env!r} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(
            max_connections=self.spec.max_concurrency, max_keepalive_connections=self.spec.max_concurrency
        )
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            limits=limits,
            timeout=httpx.Timeout(self.spec.timeout_s, connect=10.0),
        )
        try:
            r = await self.client.get("/models")
            r.raise_for_status()
            models = [m.get("id") for m in r.json().get("data", [])]
            self.max_model_len = max((int(m.get("max_model_len") or 0) for m in r.json().get("data", [])), default=0)
        except Exception as e:  # noqa: BLE001 - httpx, HTTP status or JSON errors: all mean "not usable"
            raise RuntimeError(f"OpenAI-compatible upstream {self.base_url} is not reachable: {e}") from e
        if models and self.spec.model not in models:
            raise RuntimeError(f"upstream {self.base_url} does not serve {self.spec.model!r} (it serves {models})")
        self._healthy = True

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def healthy(self) -> bool:
        return self._healthy and self.client is not None

    def stats(self) -> dict[str, int]:
        return {"prompt_tokens": self._prompt_tokens, "generation_tokens": self._gen_tokens}

    # -- request ----------------------------------------------------------------------------------
    def _body(self, req: GenRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        s = dict(req.sampling)
        body: dict[str, Any] = {"model": self.spec.model}
        for k in ("temperature", "top_p", "max_tokens", "seed", "n", "presence_penalty", "frequency_penalty"):
            if k in s:
                body[k] = s[k]
        for k in ("top_k", "repetition_penalty", "min_p"):  # extensions vLLM/SGLang accept
            if k in s:
                body[k] = s[k]
        if s.get("stop"):
            body["stop"] = s["stop"]
        st = req.structured
        if st:
            if "json" in st:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": st["json"], "strict": True},
                }
            elif "json_object" in st:
                body["response_format"] = {"type": "json_object"}
            else:
                body["structured_outputs"] = st
        if req.messages is not None:
            body["messages"] = req.messages
            if req.tools:
                body["tools"] = toolkit.openai_tools(req.tools)
                body["tool_choice"] = (
                    req.tool_choice
                    if req.tool_choice in ("auto", "required")
                    else {"type": "function", "function": {"name": req.tool_choice}}
                )
            if "logprobs" in s:
                body["logprobs"] = True
                body["top_logprobs"] = s["logprobs"]
            path = "/chat/completions"
        else:
            body["prompt"] = req.prompt
            if "logprobs" in s:
                body["logprobs"] = s["logprobs"]
            path = "/completions"
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return path, body

    def _error(self, status: int, text: str) -> Exception:
        try:
            detail = json.loads(text)
            detail = detail.get("error", detail)
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = text
        msg = f"upstream {self.base_url} answered {status}: {str(detail)[:500]}"
        if status in (400, 404, 422):
            return InvalidArgument(msg)
        if status == 429:
            return Overloaded(msg)
        return Unavailable(msg)

    def _require(self) -> httpx.AsyncClient:
        if self.client is None:
            raise Unavailable("the openai backend is not started")
        return self.client

    @staticmethod
    def _chat_logprobs(lp: dict | None) -> list[TokenLogprob]:
        out = []
        for t in (lp or {}).get("content") or []:
            out.append(
                TokenLogprob(
                    t.get("token", ""),
                    -1,
                    float(t.get("logprob", 0.0)),
                    [(a.get("token", ""), -1, float(a.get("logprob", 0.0))) for a in t.get("top_logprobs") or []],
                )
            )
        return out

    @staticmethod
    def _calls(raw: list | None) -> list[ToolCall]:
        return [
            ToolCall(
                c.get("id") or toolkit.new_call_id(),
                c["function"]["name"],
                c["function"].get("arguments") or "{}",
            )
            for c in raw or []
        ]

    async def generate(self, req: GenRequest) -> ChatResult:
        client = self._require()
        path, body = self._body(req, stream=False)
        t0 = time.perf_counter()
        try:
            r = await client.post(path, json=body)
        except httpx.HTTPError as e:
            raise Unavailable(f"upstream {self.base_url} unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise self._error(r.status_code, r.text)
        data = r.json()
        choices = []
        for c in data.get("choices", []):
            if req.messages is not None:
                msg = c.get("message") or {}
                choices.append(
                    Choice(
                        index=c.get("index", 0),
                        text=msg.get("content") or "",
                        finish_reason=c.get("finish_reason") or "stop",
                        tool_calls=self._calls(msg.get("tool_calls")),
                        logprobs=self._chat_logprobs(c.get("logprobs")),
                    )
                )
            else:
                choices.append(
                    Choice(
                        index=c.get("index", 0),
                        text=c.get("text") or "",
                        finish_reason=c.get("finish_reason") or "stop",
                    )
                )
        u = data.get("usage") or {}
        usage = Usage(
            u.get("prompt_tokens", 0),
            u.get("completion_tokens", 0),
            u.get("total_tokens", 0),
            ((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        )
        self._prompt_tokens += usage.prompt_tokens
        self._gen_tokens += usage.completion_tokens
        total = time.perf_counter() - t0
        return ChatResult(choices=sorted(choices, key=lambda c: c.index), usage=usage, timing=Timing(0.0, total, total))

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamEvent | ChatResult]:
        client = self._require()
        path, body = self._body(req, stream=True)
        t0 = time.perf_counter()
        first = 0.0
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        calls: dict[int, dict[int, dict]] = {}
        usage = Usage()
        try:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    raise self._error(r.status_code, (await r.aread()).decode(errors="replace"))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    data = json.loads(payload)
                    if data.get("usage"):
                        u = data["usage"]
                        usage = Usage(
                            u.get("prompt_tokens", 0), u.get("completion_tokens", 0), u.get("total_tokens", 0)
                        )
                    for c in data.get("choices") or []:
                        i = c.get("index", 0)
                        delta = c.get("delta") or {}
                        text = delta.get("content") if req.messages is not None else c.get("text")
                        for tc in delta.get("tool_calls") or []:
                            slot = calls.setdefault(i, {}).setdefault(
                                tc.get("index", 0), {"id": "", "name": "", "args": ""}
                            )
                            fn = tc.get("function") or {}
                            slot["id"] = tc.get("id") or slot["id"]
                            slot["name"] += fn.get("name") or ""
                            slot["args"] += fn.get("arguments") or ""
                        fr = c.get("finish_reason") or ""
                        texts.setdefault(i, [])
                        if text:
                            first = first or time.perf_counter() - t0
                            texts[i].append(text)
                        if fr:
                            finish[i] = fr
                        if text or fr:
                            yield StreamEvent(i, text or "", fr)
        except httpx.HTTPError as e:
            raise Unavailable(f"upstream {self.base_url} unreachable: {type(e).__name__}: {e}") from None
        choices = [
            Choice(
                index=i,
                text="".join(texts[i]),
                finish_reason=finish.get(i, "stop"),
                tool_calls=[
                    ToolCall(s["id"] or toolkit.new_call_id(), s["name"], s["args"] or "{}")
                    for _, s in sorted(calls.get(i, {}).items())
                ],
            )
            for i in sorted(texts)
        ]
        self._prompt_tokens += usage.prompt_tokens
        self._gen_tokens += usage.completion_tokens
        total = time.perf_counter() - t0
        yield ChatResult(choices=choices, usage=usage, timing=Timing(0.0, first or total, total))
