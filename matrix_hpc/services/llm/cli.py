"""Sub-command ``serve llm`` (filled by the LLM service)."""

from __future__ import annotations


def register_serve(sub) -> None:
    pass
