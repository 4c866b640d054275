"""The async client agents use: deadlines and retries over the service core's replica set.

The replicas (channels, balancing, affinity by key, health probes, finding a restarted replica)
are ``matrix_hpc.services.core.replicas``, shared by every client of an endpoint in a process; with
a ``key`` (the task id) the turns of one task go to one replica and reuse its prefix cache.
UNAVAILABLE and RESOURCE_EXHAUSTED are retried (another replica first) with exponential backoff
inside the call's deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc

from matrix_hpc._gen.llm.v1 import llm_pb2 as pb
from matrix_hpc._gen.llm.v1 import llm_pb2_grpc as pb_grpc
from matrix_hpc.retry import retrying
from matrix_hpc.services.core.replicas import Replica, ReplicaSet, replica_set
from matrix_hpc.services.llm.errors import InvalidRequest, ServiceError
from matrix_hpc.services.llm.results import ChatChunk, ChatResult, ToolCall, chunk_from_pb, result_from_pb
from matrix_hpc.services.llm.spec import LLMSpec

MAX_MESSAGE = 64 * 1024 * 1024


class LLMEndpoint(Protocol):
    """What a client needs of an endpoint (``matrix_hpc.services.llm.endpoint.LLMEndpoint``)."""

    name: str
    spec: LLMSpec
    replicas: list
    namespace: str | None
    uid: str
    secret: str | None
    tls_cert: bytes | None

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _transient(e: BaseException) -> bool:
    """A gRPC failure that another replica, or a later try, may not have."""
    return isinstance(e, grpc.aio.AioRpcError) and e.code() in RETRYABLE
# The scalar sampling fields of the contract (``stop`` is a list, handled apart).
_SAMPLING_KEYS = frozenset(f.name for f in pb.Sampling.DESCRIPTOR.fields if f.name != "stop")


def _pool_for(endpoint: LLMEndpoint) -> ReplicaSet:
    return replica_set(endpoint, MAX_MESSAGE, endpoint.spec.max_concurrency)


# ------------------------------------------------------------------------- request building


def _message(m: Any) -> pb.Message:
    if isinstance(m, str):
        return pb.Message(role="user", content=m)
    if isinstance(m, pb.Message):
        return m
    calls = []
    for c in m.get("tool_calls") or []:
        if isinstance(c, ToolCall):
            calls.append(pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json))
        else:
            fn = c.get("function", c)
            args = fn.get("arguments", fn.get("arguments_json", "{}"))
            calls.append(
                pb.ToolCall(
                    id=c.get("id", ""),
                    name=fn["name"],
                    arguments_json=args if isinstance(args, str) else json.dumps(args),
                )
            )
    return pb.Message(
        role=m["role"],
        content=m.get("content") or "",
        name=m.get("name") or "",
        tool_calls=calls,
        tool_call_id=m.get("tool_call_id") or "",
    )


def _tool(t: Any) -> pb.Tool:
    if isinstance(t, pb.Tool):
        return t
    fn = t.get("function", t)
    params = fn.get("parameters") or {"type": "object"}
    return pb.Tool(
        name=fn["name"],
        description=fn.get("description", ""),
        parameters_json=params if isinstance(params, str) else json.dumps(params),
    )


def _sampling(kwargs: dict[str, Any]) -> pb.Sampling:
    unknown = set(kwargs) - _SAMPLING_KEYS - {"stop"}
    if unknown:
        raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
    s = pb.Sampling(**{k: v for k, v in kwargs.items() if k in _SAMPLING_KEYS and v is not None})
    stop = kwargs.get("stop")
    if stop:
        s.stop.extend([stop] if isinstance(stop, str) else list(stop))
    return s


def _structured(
    json_schema: Any, regex: str | None, choice: Sequence[str] | None, json_object: bool
) -> pb.StructuredOutput | None:
    given = sum(x is not None for x in (json_schema, regex, choice)) + bool(json_object)
    if given > 1:
        raise ValueError("give at most one of json_schema, regex, choice, json_object")
    if json_schema is not None:
        if hasattr(json_schema, "model_json_schema"):  # a pydantic model class
            json_schema = json_schema.model_json_schema()
        return pb.StructuredOutput(json_schema=json_schema if isinstance(json_schema, str) else json.dumps(json_schema))
    if regex is not None:
        return pb.StructuredOutput(regex=regex)
    if choice is not None:
        return pb.StructuredOutput(choice=pb.ChoiceList(choices=list(choice)))
    if json_object:
        return pb.StructuredOutput(json_object=True)
    return None


def _error(e: grpc.aio.AioRpcError, name: str, where: str) -> ServiceError:
    code = e.code().name if e.code() is not None else "UNKNOWN"
    msg = f"LLM {name!r} ({where}): {code}: {e.details()}"
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(msg, code)
    return ServiceError(msg, code)


class LLMClient:
    """Cheap to make (one per step is fine): the channels live in a per-process pool."""

    def __init__(self, endpoint: LLMEndpoint, key: str | None = None):
        self.endpoint = endpoint
        self.key = key
        self.timeout_s = endpoint.spec.timeout_s
        self.retries = endpoint.spec.retries

    # -- public API -----------------------------------------------------------------------------
    async def chat(
        self,
        messages: Sequence[Any] | str,
        *,
        tools: Sequence[Any] | None = None,
        tool_choice: str | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        json_object: bool = False,
        model: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling: Any,
    ) -> ChatResult:
        """One chat turn. ``messages``: dicts ``{"role", "content"}`` (or a string: one user turn).
        ``sampling``: temperature, top_p, top_k, max_tokens, stop, seed, n, logprobs, penalties, min_p."""
        req = self._chat_request(
            messages, tools, tool_choice, json_schema, regex, choice, json_object, model, request_id, sampling
        )
        resp = await self._unary("Chat", req, timeout)
        return result_from_pb(resp)

    async def complete(
        self,
        prompt: str,
        *,
        json_schema: Any = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        json_object: bool = False,
        model: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling: Any,
    ) -> ChatResult:
        """Raw text completion (no chat template)."""
        req = pb.CompleteRequest(
            model=model or "", prompt=prompt, sampling=_sampling(sampling), request_id=request_id or ""
        )
        st = _structured(json_schema, regex, choice, json_object)
        if st is not None:
            req.structured.CopyFrom(st)
        return result_from_pb(await self._unary("Complete", req, timeout))

    async def stream_chat(
        self,
        messages: Sequence[Any] | str,
        *,
        tools: Sequence[Any] | None = None,
        tool_choice: str | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        json_object: bool = False,
        model: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling: Any,
    ) -> AsyncIterator[ChatChunk]:
        """Yields ChatChunks as text arrives; the last one has ``usage`` and ``timing``. Failures before
        the first chunk are retried like unary calls; a replica lost mid-stream raises ServiceError."""
        req = self._chat_request(
            messages, tools, tool_choice, json_schema, regex, choice, json_object, model, request_id, sampling
        )
        pool = _pool_for(self.endpoint)
        deadline = time.monotonic() + (timeout or self.timeout_s)
        avoid: set[str] = set()
        try:
            async for attempt in self._retrying(deadline, "ChatStream"):
                with attempt:
                    r = await self._acquire(pool, avoid, deadline)
                    started = False
                    call = None
                    try:
                        async with r.call_turn():
                            call = r.stub(pb_grpc.LLMStub).ChatStream(
                                req, timeout=max(0.001, deadline - time.monotonic()))
                            async for chunk in call:
                                started = True
                                yield chunk_from_pb(chunk)
                        return
                    except grpc.aio.AioRpcError as e:
                        self._failed(pool, r, e, avoid, retryable=not started)
                        raise
                    finally:
                        if call is not None and not call.done():
                            call.cancel()  # the consumer stopped early: free the server's work
        except grpc.aio.AioRpcError as e:
            raise self._gave_up(e) from None

    async def model_info(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """``ModelInfo`` of every replica this process sees as healthy."""
        from google.protobuf.json_format import MessageToDict

        pool = _pool_for(self.endpoint)
        pool.schedule_probes()
        out = []
        for r in pool.replicas:
            if r.healthy:
                resp = await r.stub(pb_grpc.LLMStub).ModelInfo(pb.ModelInfoRequest(), timeout=timeout)
                info = MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                stats = info.get("stats", {})
                more = stats.pop("more", {})
                info["stats"] = {k: int(v) for k, v in {**stats, **more}.items()}  # uint64 -> int
                out.append(info)
        return out

    # -- internals ------------------------------------------------------------------------------
    def _chat_request(
        self,
        messages,
        tools,
        tool_choice,
        json_schema,
        regex,
        choice,
        json_object,
        model,
        request_id,
        sampling,
    ) -> pb.ChatRequest:
        if isinstance(messages, str):
            messages = [messages]
        req = pb.ChatRequest(
            model=model or "",
            messages=[_message(m) for m in messages],
            sampling=_sampling(sampling),
            tools=[_tool(t) for t in tools or []],
            tool_choice=tool_choice or "",
            request_id=request_id or "",
        )
        st = _structured(json_schema, regex, choice, json_object)
        if st is not None:
            req.structured.CopyFrom(st)
        return req

    def _retrying(self, deadline: float, method: str):
        return retrying(attempts=self.retries + 1, base_s=0.05, cap_s=2.0, deadline=deadline,
                        retry_on=_transient, what=f"LLM {self.endpoint.name!r} {method}")

    async def _acquire(self, pool: ReplicaSet, avoid: set[str], deadline: float) -> Replica:
        r = await pool.acquire(self.key, avoid, deadline)
        if r is None:
            raise ServiceError(f"LLM {self.endpoint.name!r}: no healthy replica within the deadline", "UNAVAILABLE")
        return r

    def _failed(self, pool: ReplicaSet, r: Replica, e: grpc.aio.AioRpcError, avoid: set[str],
                retryable: bool = True) -> None:
        """After a failed call: a retryable failure moves on to another replica (marked down if
        unreachable); any other failure becomes the call's ServiceError."""
        if not retryable or e.code() not in RETRYABLE:
            raise _error(e, self.endpoint.name, r.address) from None
        avoid.add(r.address)
        pool.failed(r, e.code())

    def _gave_up(self, last: grpc.aio.AioRpcError) -> ServiceError:
        return ServiceError(
            f"LLM {self.endpoint.name!r}: gave up after {self.retries + 1} attempts: "
            f"{last.code().name}: {last.details()}",
            last.code().name,
        )

    async def _unary(self, method: str, req, timeout: float | None):
        pool = _pool_for(self.endpoint)
        deadline = time.monotonic() + (timeout or self.timeout_s)
        avoid: set[str] = set()
        try:
            async for attempt in self._retrying(deadline, method):
                with attempt:
                    r = await self._acquire(pool, avoid, deadline)
                    try:
                        async with r.call_turn():
                            call = getattr(r.stub(pb_grpc.LLMStub), method)
                            return await call(req, timeout=max(0.001, deadline - time.monotonic()))
                    except grpc.aio.AioRpcError as e:
                        self._failed(pool, r, e, avoid)
                        raise
        except grpc.aio.AioRpcError as e:
            raise self._gave_up(e) from None
