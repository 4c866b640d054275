"""Sub-commands ``export`` and ``status`` (filled by the run store)."""

from __future__ import annotations


def register(sub) -> None:
    pass
