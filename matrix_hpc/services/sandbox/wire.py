"""What the sandbox's client and server share beside the .proto: message size, the error type."""

from __future__ import annotations

from matrix_hpc.services.core.errors import ServiceError

__all__ = ["MAX_MESSAGE", "ServiceError"]

MAX_MESSAGE = 256 * 1024 * 1024  # bytes, either way (files put into or taken out of a session)
