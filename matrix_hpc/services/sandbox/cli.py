"""Sub-commands ``serve sandbox`` and ``image build`` (filled by the sandbox service)."""

from __future__ import annotations


def register_serve(sub) -> None:
    pass


def register_image(sub) -> None:
    pass
