"""Domain errors and the one place that maps them to gRPC status.

Domain code raises these exceptions; the server interceptor turns them into a
`google.rpc.Status` carrying an `ErrorInfo` (reason, domain, metadata) and, where
relevant, `BadRequest` field violations or `RetryInfo`. Anything else becomes
INTERNAL with a generic message (the details go to the log, not the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "parley.dev"


@dataclass(eq=False)
class ParleyError(Exception):
    """Base of every error a caller may see."""

    message: str
    reason: str = "ERROR"
    metadata: dict[str, str] = field(default_factory=dict)
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass(eq=False)
class InvalidArgument(ParleyError):
    """The request is malformed: `violations` maps field paths to what is wrong."""

    reason: str = "INVALID_ARGUMENT"
    violations: dict[str, str] = field(default_factory=dict)
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(eq=False)
class NotFound(ParleyError):
    reason: str = "NOT_FOUND"
    code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND


@dataclass(eq=False)
class AlreadyExists(ParleyError):
    reason: str = "ALREADY_EXISTS"
    code: grpc.StatusCode = grpc.StatusCode.ALREADY_EXISTS


@dataclass(eq=False)
class PermissionDenied(ParleyError):
    reason: str = "PERMISSION_DENIED"
    code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED


@dataclass(eq=False)
class Unauthenticated(ParleyError):
    reason: str = "UNAUTHENTICATED"
    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED


@dataclass(eq=False)
class FailedPrecondition(ParleyError):
    reason: str = "FAILED_PRECONDITION"
    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(eq=False)
class ResourceExhausted(ParleyError):
    """A limit was hit; `retry_after_s` tells the caller when to try again."""

    reason: str = "RESOURCE_EXHAUSTED"
    retry_after_s: float | None = None
    code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(eq=False)
class Unavailable(ParleyError):
    reason: str = "UNAVAILABLE"
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE


@dataclass(eq=False)
class DeadlineExceeded(ParleyError):
    reason: str = "DEADLINE_EXCEEDED"
    code: grpc.StatusCode = grpc.StatusCode.DEADLINE_EXCEEDED


def from_exception(exc: BaseException) -> ParleyError | None:
    """The domain error for an infrastructure failure the caller can act on, or None (INTERNAL).

    A lost or unreachable database connection is UNAVAILABLE: the statement did not complete on a live
    connection, the pool has been invalidated, and a retry (gRPC's retry policy does it) gets a fresh one.
    """
    from sqlalchemy.exc import DBAPIError, DisconnectionError

    if isinstance(exc, DisconnectionError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return Unavailable("the database connection was lost; retry the call", reason="DATABASE_UNAVAILABLE")
    if isinstance(exc, ConnectionError):
        return Unavailable(f"a backing service is unreachable ({type(exc).__name__}); retry the call",
                           reason="BACKEND_UNAVAILABLE")
    return None


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def to_status(exc: ParleyError) -> status_pb2.Status:
    """Build the `google.rpc.Status` for a domain error."""
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata)),
    ]
    if isinstance(exc, InvalidArgument) and exc.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=name, description=why)
                        for name, why in exc.violations.items()
                    ]
                )
            )
        )
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(exc.retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=exc.code.value[0], message=exc.message, details=details)


def internal_status(message: str = "internal error; see the server log for the request id") -> status_pb2.Status:
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=message,
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))],
    )


_PASSTHROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(err: grpc.aio.AioRpcError, peer: str) -> ParleyError:
    """Turn a downstream service's error into a domain error for our caller.

    Caller mistakes (bad argument, not found, ...) keep their code and message so
    the end user sees the real reason; transport failures become UNAVAILABLE.
    """
    cls = _PASSTHROUGH.get(err.code())
    if cls is not None:
        return cls(message=err.details() or err.code().name)
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(message=f"{peer} service is unavailable: {err.details()}", metadata={"peer": peer})
    return Unavailable(
        message=f"{peer} service failed: {err.code().name}: {err.details()}",
        reason="UPSTREAM_ERROR",
        metadata={"peer": peer},
    )
