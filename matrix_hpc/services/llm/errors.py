"""Errors of the LLM service, on both sides of the wire."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """The LLM service failed: deployment did not come up, or a call failed for good.

    ``code`` is the gRPC status code name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"`` ...) when the
    error came from a call, else ``None``.
    """

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep `code` through pickling (Ray moves exceptions between processes)
        return (type(self), (str(self), self.code))


class InvalidRequest(ServiceError):
    """The request was refused as invalid (INVALID_ARGUMENT); retrying it will not help."""


# --- server side: a backend raises these, the servicer turns them into status codes -----------


class RequestError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(RequestError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(RequestError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RequestError):
    code = grpc.StatusCode.UNAVAILABLE
