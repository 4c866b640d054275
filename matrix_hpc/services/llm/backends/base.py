"""What every backend implements, and the request as backends see it."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from matrix_hpc.services.llm.results import ChatResult, TokenLogprob


@dataclass
class GenRequest:
    """A validated request. ``sampling`` holds only the fields that are set (spec defaults applied):
    temperature, top_p, top_k, max_tokens, stop, seed, n, presence_penalty, frequency_penalty,
    repetition_penalty, min_p, logprobs."""

    request_id: str
    messages: list[dict[str, Any]] | None = None  # chat: [{"role", "content", ...}]
    prompt: str | None = None  # complete
    sampling: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)  # {"name", "description", "parameters"}
    tool_choice: str = "auto"  # "auto", "none", "required" or a tool name
    structured: dict[str, Any] | None = (
        None  # {"json": schema} | {"regex": s} | {"choice": [..]} | {"json_object": True}
    )

    @property
    def n(self) -> int:
        return int(self.sampling.get("n") or 1)

    @property
    def forces_tool_call(self) -> bool:
        """The reply must be a call of one of ``tools`` ("required" or a tool's name)."""
        return bool(self.tools) and self.tool_choice not in ("auto", "none")


@dataclass
class StreamEvent:
    """New text for choice ``index``; ``finish_reason`` set on its last event."""

    index: int
    delta: str
    finish_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Backend(abc.ABC):
    name: str = "?"
    max_model_len: int = 0

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model / open connections. Raise to fail the replica's start."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def healthy(self) -> bool:
        return True

    def stats(self) -> dict[str, int]:
        return {}

    async def reset_prefix_cache(self) -> bool:
        """Drop the cached prompt prefixes; False when there is none to drop or it is in use."""
        return False

    @abc.abstractmethod
    async def generate(self, req: GenRequest) -> ChatResult:
        """All choices at once (``ChatResult.request_id/model/replica`` are filled by the server)."""

    @abc.abstractmethod
    def stream(self, req: GenRequest) -> AsyncIterator[StreamEvent | ChatResult]:
        """Yields StreamEvents, then one final ChatResult (full texts, tool calls, usage, timing)."""
