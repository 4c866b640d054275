"""The error every service raises to its callers, on both sides of Ray."""

from __future__ import annotations


class ServiceError(Exception):
    """A service failed: its deployment did not come up, or a call failed for good.

    ``code`` is the gRPC status code name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``, ``"NOT_FOUND"``
    ...) when the error came from a call, else ``None``.
    """

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep `code` through pickling (Ray moves exceptions between processes)
        return (type(self), (str(self), self.code))
