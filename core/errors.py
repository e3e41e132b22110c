"""The one hierarchy of domain errors, mapped once to gRPC status codes and once to HTTP statuses.

Servicers raise these (or let them through); the gRPC interceptor and the HTTP gateway turn them
into ``INVALID_ARGUMENT``/400, ``NOT_FOUND``/404 and so on, with the message as the detail.
"""
from __future__ import annotations

import grpc


class KVMeshError(Exception):
    """Base of every error kvmesh reports to a caller."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KVMeshError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(KVMeshError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Conflict(KVMeshError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class Unavailable(KVMeshError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DataCorrupt(KVMeshError):
    grpc_code = grpc.StatusCode.DATA_LOSS
    http_status = 422


class ResourceExhausted(KVMeshError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class DeadlineExceeded(KVMeshError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class TooBusy(KVMeshError):
    """Admission refused because a bound is reached (in-flight events, queues): retry later.

    HTTP answers 429 with ``Retry-After: <retry_after>``; gRPC answers RESOURCE_EXHAUSTED.
    """

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(KVMeshError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(KVMeshError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class AlreadyExists(KVMeshError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


_BY_GRPC_CODE: dict[grpc.StatusCode, type[KVMeshError]] = {
    cls.grpc_code: cls
    for cls in (InvalidArgument, NotFound, Conflict, Unavailable, DataCorrupt, ResourceExhausted, DeadlineExceeded,
                Unauthenticated, PermissionDenied, AlreadyExists)
}

# HTTP statuses for gRPC codes that arrive from a peer rather than from our own errors.
HTTP_STATUS_BY_GRPC_CODE: dict[grpc.StatusCode, int] = {
    **{code: cls.http_status for code, cls in _BY_GRPC_CODE.items()},
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


def from_grpc_error(err: grpc.RpcError) -> KVMeshError:
    """The domain error a failed call to a peer stands for (its code and detail kept)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_GRPC_CODE.get(code, Unavailable if code == grpc.StatusCode.UNKNOWN else KVMeshError)
    return cls(detail or code.name)
