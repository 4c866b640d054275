"""The gRPC server of one LLM replica: validation, admission, error codes, health.

``LLMServer(backend, spec, name)`` serves ``matrix_hpc.llm.v1.LLM`` plus ``grpc.health.v1.Health``
on a grpc.aio server; ``await server.start(host, port)`` returns the bound ``host:port``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from typing import Any

import grpc

from matrix_hpc._gen.llm.v1 import llm_pb2 as pb
from matrix_hpc._gen.llm.v1 import llm_pb2_grpc as pb_grpc
from matrix_hpc.services.auth import TLSPair
from matrix_hpc.services.core.listen import tcp_address
from matrix_hpc.services.core.server import GrpcHost, Health, check_listen
from matrix_hpc.services.llm.backends.base import Backend, GenRequest, StreamEvent
from matrix_hpc.services.llm.errors import InvalidArgument, Overloaded, RequestError, Unavailable
from matrix_hpc.services.llm.results import (
    ChatResult,
    logprob_to_pb,
    result_to_pb,
    timing_to_pb,
    tool_call_to_pb,
    usage_to_pb,
)
from matrix_hpc.services.llm.spec import LLMSpec

log = logging.getLogger("matrix_hpc.llm")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLM"].full_name  # "matrix_hpc.llm.v1.LLM"
ROLES = ("system", "user", "assistant", "tool")
MAX_N = 16
MAX_LOGPROBS = 20
# The scalar sampling fields of the contract (``stop`` is a list, handled apart).
_SAMPLING_FIELDS = tuple(f.name for f in pb.Sampling.DESCRIPTOR.fields if f.name != "stop")
_FIXED_STATS = frozenset(pb.EngineStats.DESCRIPTOR.fields_by_name) - {"more"}  # the rest go in `more`


def _bad(msg: str) -> InvalidArgument:
    return InvalidArgument(msg)


def sampling_from_pb(s: pb.Sampling, defaults: dict[str, Any]) -> dict[str, Any]:
    """Set fields of ``s`` over ``defaults``; raises InvalidArgument naming the bad field."""
    out = {k: v for k, v in defaults.items() if v is not None}
    for f in _SAMPLING_FIELDS:
        if s.HasField(f):
            out[f] = getattr(s, f)
    if s.stop:
        out["stop"] = list(s.stop)
    for f in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if f in out and not math.isfinite(out[f]):
            raise _bad(f"sampling.{f} must be a finite number, got {out[f]}")
    if "temperature" in out and out["temperature"] < 0:
        raise _bad(f"sampling.temperature must be >= 0, got {out['temperature']:g}")
    if "top_p" in out and not 0 < out["top_p"] <= 1:
        raise _bad(f"sampling.top_p must be in (0, 1], got {out['top_p']:g}")
    if "top_k" in out and out["top_k"] < -1:
        raise _bad(f"sampling.top_k must be -1, 0 (off) or >= 1, got {out['top_k']}")
    if "max_tokens" in out and out["max_tokens"] < 1:
        raise _bad(f"sampling.max_tokens must be >= 1, got {out['max_tokens']}")
    if "n" in out and not 1 <= out["n"] <= MAX_N:
        raise _bad(f"sampling.n must be in 1..{MAX_N}, got {out['n']}")
    for f in ("presence_penalty", "frequency_penalty"):
        if f in out and not -2 <= out[f] <= 2:
            raise _bad(f"sampling.{f} must be in [-2, 2], got {out[f]:g}")
    if "repetition_penalty" in out and out["repetition_penalty"] <= 0:
        raise _bad(f"sampling.repetition_penalty must be > 0, got {out['repetition_penalty']:g}")
    if "min_p" in out and not 0 <= out["min_p"] <= 1:
        raise _bad(f"sampling.min_p must be in [0, 1], got {out['min_p']:g}")
    if "logprobs" in out and not 0 <= out["logprobs"] <= MAX_LOGPROBS:
        raise _bad(f"sampling.logprobs must be in 0..{MAX_LOGPROBS}, got {out['logprobs']}")
    if any(not x for x in out.get("stop") or []):
        raise _bad("sampling.stop must not contain empty strings")
    return out


def structured_from_pb(s: pb.StructuredOutput) -> dict[str, Any] | None:
    kind = s.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_schema":
        try:
            schema = json.loads(s.json_schema)
        except ValueError as e:
            raise _bad(f"structured.json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise _bad("structured.json_schema must be a JSON object (a JSON schema)")
        return {"json": schema}
    if kind == "regex":
        if not s.regex:
            raise _bad("structured.regex must not be empty")
        return {"regex": s.regex}
    if kind == "choice":
        if not s.choice.choices:
            raise _bad("structured.choice must list at least one string")
        return {"choice": list(s.choice.choices)}
    return {"json_object": True}


def messages_from_pb(msgs) -> list[dict[str, Any]]:
    if not msgs:
        raise _bad("messages must not be empty")
    out = []
    for i, m in enumerate(msgs):
        if m.role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}")
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": t.id,
                    "type": "function",
                    "function": {"name": t.name, "arguments": t.arguments_json or "{}"},
                }
                for t in m.tool_calls
            ]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def tools_from_pb(tools) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        if not t.name:
            raise _bad(f"tools[{i}].name must not be empty")
        params: Any = {"type": "object"}
        if t.parameters_json:
            try:
                params = json.loads(t.parameters_json)
            except ValueError as e:
                raise _bad(f"tools[{i}].parameters_json is not valid JSON: {e}") from None
        out.append({"name": t.name, "description": t.description, "parameters": params})
    return out


class LLMServicer(pb_grpc.LLMServicer):
    def __init__(self, backend: Backend, spec: LLMSpec, name: str, health_servicer: Health):
        self.backend = backend
        self.spec = spec
        self.name = name
        self.model_names = {spec.name_served, spec.model, name}
        self.defaults = spec.sampling.model_dump(exclude_none=True)
        self.health = health_servicer
        self.address = ""
        self.in_flight = 0
        self.finished = 0
        self._healthy = True

    # -- helpers ------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model and model not in self.model_names:
            raise _bad(f"unknown model {model!r}: this service ({self.name!r}) serves {self.spec.name_served!r}")

    def _request_id(self, rid: str) -> str:
        return rid or uuid.uuid4().hex

    def _chat_request(self, request: pb.ChatRequest) -> GenRequest:
        self._check_model(request.model)
        tools = tools_from_pb(request.tools)
        choice = request.tool_choice or "auto"
        names = {t["name"] for t in tools}
        if choice not in ("auto", "none", "required") and choice not in names:
            raise _bad(f"tool_choice {choice!r} names no tool in tools ({', '.join(sorted(names)) or 'none'})")
        if choice == "required" and not tools:
            raise _bad("tool_choice 'required' needs at least one tool")
        structured = structured_from_pb(request.structured)
        if structured and tools and choice not in ("auto", "none"):
            raise _bad("structured output and a forced tool call cannot be combined")
        return GenRequest(
            request_id=self._request_id(request.request_id),
            messages=messages_from_pb(request.messages),
            sampling=sampling_from_pb(request.sampling, self.defaults),
            tools=tools if choice != "none" else [],
            tool_choice=choice if choice != "none" else "auto",
            structured=structured,
        )

    def _complete_request(self, request: pb.CompleteRequest) -> GenRequest:
        self._check_model(request.model)
        return GenRequest(
            request_id=self._request_id(request.request_id),
            prompt=request.prompt,
            sampling=sampling_from_pb(request.sampling, self.defaults),
            structured=structured_from_pb(request.structured),
        )

    def _admit(self) -> None:
        if not self._healthy or not self.backend.healthy():
            self.mark_unhealthy()
            raise Unavailable(f"replica {self.address} of {self.name!r}: the engine is not running")
        if self.in_flight >= self.spec.max_concurrency:
            raise Overloaded(
                f"replica {self.address} of {self.name!r} is at its limit of {self.spec.max_concurrency} "
                "requests in flight; retry later or on another replica"
            )

    def mark_unhealthy(self) -> None:
        if self._healthy:
            log.error("LLM replica %s of %r is unhealthy: reporting NOT_SERVING", self.address, self.name)
        self._healthy = False
        self.health.set(False)

    async def _fail(self, context: grpc.aio.ServicerContext, e: BaseException) -> None:
        if isinstance(e, Unavailable):
            self.mark_unhealthy()
        if isinstance(e, RequestError):
            await context.abort(e.code, str(e))
        log.exception("LLM request failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _finish(self, result: ChatResult, rid: str) -> pb.GenerateResponse:
        result.request_id = rid
        result.model = self.spec.name_served
        result.replica = self.address
        return result_to_pb(result)

    # -- RPCs ---------------------------------------------------------------------------------
    async def Chat(self, request, context):
        return await self._unary(request, context, self._chat_request)

    async def Complete(self, request, context):
        return await self._unary(request, context, self._complete_request)

    async def _unary(self, request, context, convert):
        try:
            req = convert(request)
            self._admit()
        except RequestError as e:
            await self._fail(context, e)
        self.in_flight += 1
        try:
            result = await self.backend.generate(req)
        except RequestError as e:
            await self._fail(context, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - logged by _fail, and the call ends with INTERNAL
            await self._fail(context, e)
        finally:
            self.in_flight -= 1
        self.finished += 1
        return self._finish(result, req.request_id)

    async def ChatStream(self, request, context):
        try:
            req = self._chat_request(request)
            self._admit()
        except RequestError as e:
            await self._fail(context, e)
        self.in_flight += 1
        try:
            async for ev in self.backend.stream(req):
                if isinstance(ev, StreamEvent):
                    yield pb.ChatChunk(
                        request_id=req.request_id,
                        index=ev.index,
                        delta=ev.delta,
                        finish_reason=ev.finish_reason,
                        logprobs=[logprob_to_pb(lp) for lp in ev.logprobs],
                    )
                else:
                    for c in ev.choices:  # tool calls are known once the text is complete
                        if c.tool_calls:
                            yield pb.ChatChunk(
                                request_id=req.request_id,
                                index=c.index,
                                finish_reason=c.finish_reason,
                                tool_calls=[tool_call_to_pb(t) for t in c.tool_calls],
                            )
                    yield pb.ChatChunk(
                        request_id=req.request_id, usage=usage_to_pb(ev.usage), timing=timing_to_pb(ev.timing)
                    )
        except RequestError as e:
            await self._fail(context, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - logged by _fail, and the call ends with INTERNAL
            await self._fail(context, e)
        finally:
            self.in_flight -= 1
        self.finished += 1

    async def ModelInfo(self, request, context):
        s = self.backend.stats()
        return pb.ModelInfoResponse(
            name=self.name,
            model=self.spec.name_served,
            backend=self.backend.name,
            max_model_len=self.backend.max_model_len,
            max_concurrency=self.spec.max_concurrency,
            replica=self.address,
            healthy=self._healthy and self.backend.healthy(),
            stats=pb.EngineStats(
                requests=self.finished,
                in_flight=self.in_flight,
                max_batch=s.get("max_batch", 0),
                steps=s.get("steps", 0),
                prompt_tokens=s.get("prompt_tokens", 0),
                generation_tokens=s.get("generation_tokens", 0),
                prefix_cache_queries=s.get("prefix_cache_queries", 0),
                prefix_cache_hits=s.get("prefix_cache_hits", 0),
                batch_sum=s.get("batch_sum", 0),
                more={k: v for k, v in s.items() if k not in _FIXED_STATS},
            ),
        )


class LLMServer:
    """A started backend behind a grpc.aio server (one replica)."""

    def __init__(self, backend: Backend, spec: LLMSpec, name: str):
        self.backend = backend
        self.spec = spec
        self.name = name
        self.host: GrpcHost | None = None
        self.health = Health(SERVICE_NAME)
        self.servicer = LLMServicer(backend, spec, name, self.health)
        self.address = ""
        self._watch: asyncio.Task | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, secret: str | None = None,
                    tls: TLSPair | None = None) -> str:
        """Start the backend, then serve on ``host:port``; returns ``host:port``."""
        return await self.serve_at(tcp_address(host, port), secret=secret, tls=tls)

    async def serve_at(self, address: str, *, secret: str | None = None, tls: TLSPair | None = None) -> str:
        """Start the backend, then serve at ``address`` (``host:port`` or ``unix:PATH``); returns the bound
        address. Health is SERVING once this returns. With ``secret``, every call but health checks must
        carry it; with ``tls``, over TLS (see ``matrix_hpc.services.auth``)."""
        what = f"LLM {self.name!r}"
        check_listen(address, secret, what)
        await self.backend.start()
        self.host = GrpcHost(what, SERVICE_NAME, lambda srv: pb_grpc.add_LLMServicer_to_server(self.servicer, srv),
                             secret=secret, tls=tls, health=self.health)
        self.address = await self.host.listen(address)
        self.servicer.address = self.address
        self.health.set(True)
        self._watch = asyncio.get_running_loop().create_task(self._watch_engine())
        return self.address

    async def _watch_engine(self) -> None:
        """Report NOT_SERVING as soon as the backend says its engine died (not only on a request)."""
        while True:
            await asyncio.sleep(1.0)
            if not self.backend.healthy():
                self.servicer.mark_unhealthy()
                return

    @property
    def healthy(self) -> bool:
        return self.servicer._healthy and self.backend.healthy()

    async def reset_prefix_cache(self) -> bool:
        """Admin, in-process only (no RPC): forget the engine's cached prompt prefixes, e.g. between
        benchmark phases that send identical prompts. True if the cache was dropped."""
        return await self.backend.reset_prefix_cache()

    async def stop(self, grace: float = 1.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.host is not None:
            await self.host.stop(grace)
        await self.backend.close()


async def serve(spec: LLMSpec, name: str, *, host: str = "127.0.0.1", port: int = 0, address: str | None = None,
                base_dir=None, secret: str | None = None, tls: TLSPair | None = None) -> LLMServer:
    """Start the backend and serve it at ``address`` (``host:port`` or ``unix:PATH``; default ``host:port``)."""
    from matrix_hpc.services.llm.backends import make_backend

    address = address or tcp_address(host, port)
    check_listen(address, secret, f"LLM {name!r}")
    server = LLMServer(make_backend(spec, base_dir=base_dir), spec, name)
    t0 = time.monotonic()
    await server.serve_at(address, secret=secret, tls=tls)
    log.info("LLM %r (%s) serving on %s after %.1fs", name, spec.backend, server.address, time.monotonic() - t0)
    return server
