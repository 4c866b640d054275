"""Sub-commands ``run`` and ``resume`` (filled by the runtime)."""

from __future__ import annotations


def register(sub) -> None:
    pass
