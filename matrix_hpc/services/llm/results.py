"""Plain-Python views of requests and responses (what backends produce and clients return)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from matrix_hpc._gen.llm.v1 import llm_pb2 as pb


@dataclass
class ToolCall:
    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> Any:
        return json.loads(self.arguments_json or "{}")


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, int, float]] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass
class Timing:
    queue_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass
class ChatResult:
    """A finished chat or completion call. ``text``/``finish_reason``/``tool_calls`` are choice 0's."""

    choices: list[Choice]
    usage: Usage
    timing: Timing = field(default_factory=Timing)
    request_id: str = ""
    model: str = ""
    replica: str = ""

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason if self.choices else ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.choices[0].tool_calls if self.choices else []

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.choices]


@dataclass
class ChatChunk:
    """One streamed piece: ``delta`` text of choice ``index``; the last chunk carries ``usage``."""

    index: int
    delta: str
    finish_reason: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    usage: Usage | None = None
    timing: Timing | None = None
    request_id: str = ""


# ---------------------------------------------------------------- proto <-> python


def tool_call_to_pb(t: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=t.id, name=t.name, arguments_json=t.arguments_json)


def logprob_to_pb(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token=lp.token,
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token=t, token_id=i, logprob=v) for t, i, v in lp.top],
    )


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
    )


def timing_to_pb(t: Timing) -> pb.Timing:
    return pb.Timing(queue_s=t.queue_s, first_token_s=t.first_token_s, total_s=t.total_s)


def result_to_pb(r: ChatResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=r.request_id,
        model=r.model,
        replica=r.replica,
        usage=usage_to_pb(r.usage),
        timing=timing_to_pb(r.timing),
        choices=[
            pb.Choice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                tool_calls=[tool_call_to_pb(t) for t in c.tool_calls],
                logprobs=[logprob_to_pb(lp) for lp in c.logprobs],
                completion_tokens=c.completion_tokens,
            )
            for c in r.choices
        ],
    )


def _tool_call(m: pb.ToolCall) -> ToolCall:
    return ToolCall(id=m.id, name=m.name, arguments_json=m.arguments_json)


def _logprob(m: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(m.token, m.token_id, m.logprob, [(t.token, t.token_id, t.logprob) for t in m.top])


def _usage(m: pb.Usage) -> Usage:
    return Usage(m.prompt_tokens, m.completion_tokens, m.total_tokens, m.cached_prompt_tokens)


def _timing(m: pb.Timing) -> Timing:
    return Timing(m.queue_s, m.first_token_s, m.total_s)


def result_from_pb(m: pb.GenerateResponse) -> ChatResult:
    return ChatResult(
        choices=[
            Choice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                tool_calls=[_tool_call(t) for t in c.tool_calls],
                logprobs=[_logprob(lp) for lp in c.logprobs],
                completion_tokens=c.completion_tokens,
            )
            for c in m.choices
        ],
        usage=_usage(m.usage),
        timing=_timing(m.timing),
        request_id=m.request_id,
        model=m.model,
        replica=m.replica,
    )


def chunk_from_pb(m: pb.ChatChunk) -> ChatChunk:
    return ChatChunk(
        index=m.index,
        delta=m.delta,
        finish_reason=m.finish_reason,
        tool_calls=[_tool_call(t) for t in m.tool_calls],
        logprobs=[_logprob(lp) for lp in m.logprobs],
        usage=_usage(m.usage) if m.HasField("usage") else None,
        timing=_timing(m.timing) if m.HasField("timing") else None,
        request_id=m.request_id,
    )
