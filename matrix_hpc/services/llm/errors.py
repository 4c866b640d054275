"""Errors of the LLM service, on both sides of the wire."""

from __future__ import annotations

import grpc

from matrix_hpc.services.core.errors import ServiceError

__all__ = ["InvalidArgument", "InvalidRequest", "Overloaded", "RequestError", "ServiceError", "Unavailable"]


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
