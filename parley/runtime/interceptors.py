"""gRPC interceptors: request ids, logging, metrics and error mapping in one place.

Server side, `ObservabilityInterceptor` wraps every handler so that
- the request id from `x-request-id` metadata (or a new one) is bound to a ContextVar
  (and so to every log line and every outgoing call) and answered in the trailers,
- a `ParleyError` raised by domain code becomes its `google.rpc.Status`,
- any other exception becomes INTERNAL without leaking details,
- request count and latency are recorded per service, method and status code.

Client side, `RequestIdClientInterceptor` copies the current request id into the
metadata of every outgoing call, so one id follows a request from service to service.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog
from grpc_status import rpc_status

from parley.runtime.errors import ParleyError, PermissionDenied, from_exception, internal_status, to_status
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics
from parley.runtime.network import peer_is_local

REQUEST_ID_KEY = "x-request-id"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # negative: the caller's gRPC must not retry (gRFC A6)
INTERNAL_TOKEN_KEY = "x-parley-internal"
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("parley_request_id", default=None)
_QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

_log = get_logger("parley.rpc")


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2)
    return service, method


def _incoming_request_id(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and value and len(value) <= 128:
            return str(value)
    return uuid.uuid4().hex


class _Call:
    """Bookkeeping of one RPC: binds the request id, times it, records the outcome.

    The outcome (request count, latency, the access log line) is recorded when gRPC reports the RPC terminated,
    i.e. after its status went out: the client does not wait for Parley's own bookkeeping.
    """

    def __init__(self, metrics: Metrics, service: str, method: str, request_id: str,
                 context: grpc.aio.ServicerContext) -> None:
        self.metrics, self.service, self.method, self.request_id = metrics, service, method, request_id
        self.peer = context.peer()  # "ipv4:127.0.0.1:52114", ..., or "inproc:" for a co-hosted service's call
        self.code = "OK"
        self.started = time.perf_counter()
        self.elapsed: float | None = None
        self._tokens: list[Any] = []
        context.add_done_callback(self._record)

    def __enter__(self) -> _Call:
        self._tokens.append(REQUEST_ID.set(self.request_id))
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.started
        structlog.contextvars.unbind_contextvars("request_id")
        REQUEST_ID.reset(self._tokens.pop())

    def _record(self, _context: grpc.aio.ServicerContext) -> None:
        if self.elapsed is None:  # the RPC ended while its handler was parked at a `yield`: the client went away
            self.elapsed, self.code = time.perf_counter() - self.started, "CANCELLED"
        self.metrics.rpc_requests.labels(self.service, self.method, self.code).inc()
        self.metrics.rpc_latency.labels(self.service, self.method, self.code).observe(self.elapsed)
        if self.service not in _QUIET_SERVICES:
            _log.info("rpc", service=self.service, method=self.method, code=self.code,
                      ms=round(self.elapsed * 1000, 2), request_id=self.request_id, peer=self.peer)

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        """Abort the RPC with the status for `exc` (always raises), the request id in its trailers.

        Only an infrastructure failure (`errors.from_exception`: a lost database connection) invites the caller's
        gRPC retry policy to try again. An UNAVAILABLE a service raises itself (no provider could answer, a
        downstream service was down) comes after that service's own retries, so it carries a negative
        `grpc-retry-pushback-ms`, which tells gRPC not to retry it (gRFC A6): no retry storms across hops.
        """
        infrastructure = from_exception(exc)
        exc = infrastructure or exc
        trailers = [(REQUEST_ID_KEY, self.request_id)]
        if isinstance(exc, ParleyError):
            self.code = exc.code.name
            if exc.code == grpc.StatusCode.INTERNAL:
                _log.error("rpc_failed", error=exc.message)
            status = rpc_status.to_status(to_status(exc))
            if exc.code == grpc.StatusCode.UNAVAILABLE and infrastructure is None:
                trailers.append((RETRY_PUSHBACK_KEY, "-1"))
        else:
            self.code = "INTERNAL"
            _log.error("rpc_crashed", service=self.service, method=self.method, exc_info=exc)
            status = rpc_status.to_status(internal_status())
        await context.abort(status.code, status.details, (*status.trailing_metadata, *trailers))


class InternalGuard:
    """Internal services (memory, inference, tools) answer only local peers or peers presenting the token."""

    def __init__(self, services: frozenset[str], token: str | None) -> None:
        self.services, self._token = services, token

    def check(self, service: str, metadata, context: grpc.aio.ServicerContext) -> None:
        if service not in self.services or peer_is_local(context.peer()):
            return
        presented = next((v for k, v in metadata or () if k == INTERNAL_TOKEN_KEY), None)
        if self._token and presented is not None and hmac.compare_digest(str(presented), self._token):
            return
        raise PermissionDenied(
            message=f"{service} is internal: call it from this machine or present the {INTERNAL_TOKEN_KEY} token",
            reason="INTERNAL_SERVICE",
        )


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, internal: InternalGuard | None = None) -> None:
        self._metrics = metrics
        self._internal = internal or InternalGuard(frozenset(), None)

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        request_id = _incoming_request_id(handler_call_details.invocation_metadata)
        metadata = handler_call_details.invocation_metadata
        metrics, internal = self._metrics, self._internal

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            # The request id rides in the trailers, which go out with the status: no headers are sent on their
            # own (an extra operation per call), and an error is a trailers-only answer, which the caller's gRPC
            # retry policy may retry (headers would commit the call).
            async def unary_unary(request, context):
                with _Call(metrics, service, method, request_id, context) as call:
                    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                    try:
                        internal.check(service, metadata, context)
                        return await behavior(request, context)
                    except (asyncio.CancelledError, grpc.aio.AbortError):
                        call.code = _code_of(context, "CANCELLED")
                        raise
                    except Exception as exc:  # the one place errors become statuses
                        await call.fail(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def unary_stream(request, context) -> AsyncIterator[Any]:
                with _Call(metrics, service, method, request_id, context) as call:
                    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                    try:
                        internal.check(service, metadata, context)
                        async for item in stream_behavior(request, context):
                            yield item
                    except (asyncio.CancelledError, grpc.aio.AbortError):
                        call.code = _code_of(context, "CANCELLED")
                        raise
                    except Exception as exc:
                        await call.fail(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _code_of(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


def with_request_id(metadata) -> grpc.aio.Metadata:
    """An outgoing call's metadata, with the current request id added unless the caller set one."""
    metadata = grpc.aio.Metadata(*(tuple(metadata) if metadata else ()))
    request_id = REQUEST_ID.get()
    if request_id and REQUEST_ID_KEY not in metadata:
        metadata.add(REQUEST_ID_KEY, request_id)
    return metadata


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    if not REQUEST_ID.get():
        return details
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, with_request_id(details.metadata), details.credentials, details.wait_for_ready
    )


class RequestIdClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)
