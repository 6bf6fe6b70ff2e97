"""The one place where serving errors become gRPC status codes (both servers use it)."""

from __future__ import annotations

import grpc

from serving.api.errors import Code, ServingError

_GRPC_CODES = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message) for any error that ends a request.

    A :class:`ServingError` keeps its code and message; anything else is INTERNAL with
    its type named (it is a bug, and the caller must never get a silently wrong score).
    """
    if isinstance(error, ServingError):
        return _GRPC_CODES[error.code], error.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
