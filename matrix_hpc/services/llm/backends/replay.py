"""Record a backend's replies, so that the ``sim`` backend can replay them.

A service with ``record: path`` appends one JSON line per answered call: the request's key (a hash
of everything that decides the reply: messages or prompt, sampling, tools, structured output) and
what the engine did (prompt tokens, those served from its prefix cache, each choice's text, finish
reason, tokens and tool calls). A ``sim`` service with ``sim.replay: path`` answers a request found
there with the recorded reply, its recorded token counts and cache hits: the same workload as the
recorded run, timed by the cost model. That is how the cost model is checked against a real engine
(benchmarks/bench_sim_fit.py).

A key recorded several times (the same request sent in several runs) is replayed in the recorded
order, then its last reply again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from matrix_hpc.services.llm.backends.base import Backend, GenRequest, StreamEvent
from matrix_hpc.services.llm.results import ChatResult, Choice, ToolCall


def request_key(req: GenRequest) -> str:
    """What decides a reply, hashed (the request id does not)."""
    fields = [req.messages, req.prompt, req.sampling, req.tools, req.tool_choice, req.structured]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class Recorded:
    """One recorded reply."""

    prompt_tokens: int
    cached_prompt_tokens: int
    choices: list[Choice]


class Trace:
    """The replies of a record file, by request key."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._by_key: dict[str, deque[Recorded]] = {}
        with self.path.open() as f:
            for lineno, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                    recorded = Recorded(entry["prompt_tokens"], entry["cached_prompt_tokens"], [
                        Choice(i, c["text"], c["finish_reason"], [ToolCall(*t) for t in c["tool_calls"]],
                               completion_tokens=c["completion_tokens"])
                        for i, c in enumerate(entry["choices"])])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}:{lineno}: not a recorded reply ({e!r})") from None
                self._by_key.setdefault(entry["key"], deque()).append(recorded)

    def take(self, req: GenRequest) -> Recorded | None:
        queue = self._by_key.get(request_key(req))
        if not queue:
            return None
        return queue.popleft() if len(queue) > 1 else queue[0]


class Recorder(Backend):
    """``inner``, with every answered call appended to ``path``."""

    def __init__(self, inner: Backend, path: Path | str):
        self.inner = inner
        self.path = Path(path)
        self.name = inner.name
        self._fd: int | None = None

    @property
    def max_model_len(self) -> int:  # type: ignore[override]
        return self.inner.max_model_len

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def healthy(self) -> bool:
        return self.inner.healthy()

    def stats(self) -> dict[str, int]:
        return self.inner.stats()

    async def reset_prefix_cache(self) -> bool:
        return await self.inner.reset_prefix_cache()

    async def generate(self, req: GenRequest) -> ChatResult:
        result = await self.inner.generate(req)
        self._write(req, result)
        return result

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamEvent | ChatResult]:
        async for event in self.inner.stream(req):
            if isinstance(event, ChatResult):
                self._write(req, event)
            yield event

    def _write(self, req: GenRequest, result: ChatResult) -> None:
        entry = {"key": request_key(req), "prompt_tokens": result.usage.prompt_tokens,
                 "cached_prompt_tokens": result.usage.cached_prompt_tokens,
                 "choices": [{"text": c.text, "finish_reason": c.finish_reason,
                              "completion_tokens": c.completion_tokens,
                              "tool_calls": [[t.id, t.name, t.arguments_json] for t in c.tool_calls]}
                             for c in result.choices]}
        # One write per line on an O_APPEND file: lines of concurrent calls do not interleave.
        os.write(self._fd, (json.dumps(entry) + "\n").encode())
