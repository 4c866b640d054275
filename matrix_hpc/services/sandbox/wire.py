"""What the sandbox's client and server share beside the .proto: message size, the error type."""

from __future__ import annotations

MAX_MESSAGE = 256 * 1024 * 1024  # bytes, either way (files put into or taken out of a session)


class ServiceError(RuntimeError):
    """The sandbox service failed (could not start, unreachable, full, or refused a request).

    ``code`` is the gRPC status code name when the failure came from a call (e.g. "NOT_FOUND").
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
