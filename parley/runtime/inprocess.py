"""Calls between services that one process hosts (`parley up`), without the network in between.

A `LocalChannel` stands where a `grpc.aio.Channel` would: the generated stubs and `clients.Client` use it
unchanged. A call runs the very handler that the process's gRPC server would run, wrapped by the same server
interceptors (request id, internal-call guard, error mapping, metrics, access log), so a co-hosted call keeps
what a caller relies on from gRPC:

- the request and the response are serialized and parsed again (the callee gets its own copy, and messages
  above `MAX_MESSAGE_BYTES` fail with RESOURCE_EXHAUSTED, as on the wire);
- metadata reaches `invocation_metadata()`, with the caller's request id (`interceptors.with_request_id`);
- the handler runs in a task of its own with a fresh `contextvars.Context`, as on a server: nothing bound in
  the caller's context (log fields, the request id ContextVar) leaks into the callee's, or back;
- a deadline cancels the handler and fails with DEADLINE_EXCEEDED; a caller that goes away cancels it;
- an error is a `grpc.aio.AioRpcError` with the code, details and trailers (`google.rpc.Status` details,
  `grpc-retry-pushback-ms`) that the server sent;
- UNAVAILABLE is retried under the channel's own retry policy (`clients.RETRY_POLICY`, gRFC A6), pushback
  honoured, within the deadline.

What it leaves out is the transport: HTTP/2 framing, the gRPC core's threads and completion queue, and their
round trip through the event loop, ~1 ms of CPU per call on this project's 2-core reference machine.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from parley.runtime.clients import MAX_MESSAGE_BYTES, RETRY_POLICY
from parley.runtime.interceptors import RETRY_PUSHBACK_KEY, with_request_id

PEER = "inproc:"  # what `context.peer()` says of an in-process caller (`network.peer_is_local` knows it)
_END, _CANCELLED = object(), object()


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class LocalHandlers:
    """The method handlers of co-hosted services: stands as the `server` of the generated
    `add_XServicer_to_server`, beside the real gRPC server, and wraps a call in the server's interceptors."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> None:
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self.open = True

        async def innermost(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return self._methods.get(details.method)

        continuation: Callable = innermost  # the server's interceptors around it, the first outermost
        for interceptor in reversed(interceptors):
            continuation = _chain(interceptor, continuation)
        self._continuation = continuation

    # the two methods generated code calls on a server
    def add_generic_rpc_handlers(self, handlers) -> None:  # the registered ones below cover the same methods
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    def knows(self, method: str) -> bool:
        return method in self._methods

    async def handler(self, method: str, metadata: tuple[tuple[str, Any], ...]) -> grpc.RpcMethodHandler | None:
        """The handler for one call, through every interceptor (as the server builds it per call)."""
        return await self._continuation(_Details(method, metadata))


def _chain(interceptor: grpc.aio.ServerInterceptor, continuation: Callable) -> Callable:
    async def call(details: grpc.HandlerCallDetails):
        return await interceptor.intercept_service(continuation, details)

    return call


class LocalContext(grpc.aio.ServicerContext):
    """The servicer context of an in-process call."""

    def __init__(self, metadata: tuple[tuple[str, Any], ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailers: tuple[tuple[str, Any], ...] = ()
        self._initial: tuple[tuple[str, Any], ...] = ()
        self._callbacks: list[Callable] = []
        self._done = False
        self._cancelled = False

    # -- what handlers and interceptors use
    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return PEER

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self._trailers = tuple(trailing_metadata)

    def trailing_metadata(self):
        return self._trailers

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str | None:
        return self._details

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status code other than OK")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailers = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def abort_with_status(self, status) -> None:
        raise RuntimeError("a grpc.aio handler aborts with `await context.abort(...)`")

    async def send_initial_metadata(self, initial_metadata) -> None:
        self._initial = tuple(initial_metadata)

    def add_done_callback(self, callback) -> None:
        self._callbacks.append(callback)

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    # -- the rest of the interface: what has no meaning without a transport
    async def read(self):
        raise RuntimeError("in-process calls are unary-request")

    async def write(self, message) -> None:
        raise RuntimeError("a unary-stream handler yields its messages")

    def set_compression(self, compression) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None

    def auth_context(self):
        return {}

    # -- the call's end
    def finish(self, cancelled: bool = False) -> None:
        if self._done:
            return
        self._done, self._cancelled = True, cancelled
        if cancelled and self._code is None:
            self._code = grpc.StatusCode.CANCELLED
        for callback in self._callbacks:
            callback(self)


def _rpc_error(code: grpc.StatusCode, details: str, trailers=(), initial=()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(*initial), grpc.aio.Metadata(*trailers), details=details)


def _checked(data: bytes, what: str) -> bytes:
    if len(data) > MAX_MESSAGE_BYTES:
        raise _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{what} message larger than max ({len(data)} vs. {MAX_MESSAGE_BYTES})")
    return data


def _outcome(context: LocalContext, exc: BaseException | None) -> grpc.aio.AioRpcError:
    """The error a failed handler answers with, as its gRPC server would put it."""
    if isinstance(exc, grpc.aio.AbortError) or (exc is None and context.code() not in (None, grpc.StatusCode.OK)):
        return _rpc_error(context.code() or grpc.StatusCode.UNKNOWN, context.details() or "",
                          context.trailing_metadata(), context._initial)
    return _rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected error in RPC handling: {type(exc).__name__}",
                      context.trailing_metadata(), context._initial)


def _pushback_s(err: grpc.aio.AioRpcError) -> float | None:
    """None: do not retry (gRFC A6: negative or malformed pushback); else the pushback (0: the policy's backoff)."""
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                ms = int(value)
            except ValueError:
                return None
            return None if ms < 0 else ms / 1000
    return 0.0


class _Retrying:
    """Which attempt may follow which, under the channel's retry policy (the one declared in its service config)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.attempt = 1
        self.backoff = _duration(RETRY_POLICY["initialBackoff"])

    async def again(self, err: grpc.aio.AioRpcError) -> bool:
        if err.code().name not in RETRY_POLICY["retryableStatusCodes"] or self.attempt >= RETRY_POLICY["maxAttempts"]:
            return False
        pushback = _pushback_s(err)
        if pushback is None:
            return False
        delay = pushback or random.uniform(0, self.backoff)
        loop = asyncio.get_running_loop()
        if self.deadline is not None and loop.time() + delay >= self.deadline:
            return False
        self.backoff = min(self.backoff * RETRY_POLICY["backoffMultiplier"], _duration(RETRY_POLICY["maxBackoff"]))
        self.attempt += 1
        await asyncio.sleep(delay)
        return True


def _duration(text: str) -> float:
    return float(text.rstrip("s"))


class LocalChannel:
    """A `grpc.aio.Channel` for the methods of co-hosted services (unary-unary and unary-stream)."""

    def __init__(self, handlers: LocalHandlers) -> None:
        self._handlers = handlers

    def unary_unary(self, method: str, request_serializer=None, response_deserializer=None, **_kw):
        return _Method(_UnaryCall, self._handlers, method, request_serializer, response_deserializer)

    def unary_stream(self, method: str, request_serializer=None, response_deserializer=None, **_kw):
        return _Method(_StreamCall, self._handlers, method, request_serializer, response_deserializer)

    def stream_unary(self, method: str, *args, **kwargs):
        raise NotImplementedError("in-process calls have no client streaming (no Parley RPC uses it)")

    def stream_stream(self, method: str, *args, **kwargs):
        raise NotImplementedError("in-process calls have no client streaming (no Parley RPC uses it)")

    async def close(self, grace: float | None = None) -> None:
        pass

    async def __aenter__(self) -> LocalChannel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _Method:
    """One method of a co-hosted service (a gRPC multi-callable): calling it makes a `call_cls` call."""

    def __init__(self, call_cls: type[_Call], handlers: LocalHandlers, method: str, serialize, deserialize) -> None:
        self._call_cls, self._handlers, self._method = call_cls, handlers, method
        self._serialize = serialize or (lambda m: m)
        self._deserialize = deserialize or (lambda b: b)

    def __call__(self, request, *, timeout: float | None = None, metadata=None, **_kw) -> _Call:
        return self._call_cls(self, request, timeout, metadata)

    def _start(self, request, timeout: float | None, metadata) -> tuple[bytes, tuple, float | None]:
        if not self._handlers.open:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "the co-hosted server has stopped")
        if not self._handlers.knows(self._method):
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {self._method}")
        data = _checked(self._serialize(request), "Sent")
        md = tuple((k, v) for k, v in metadata)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return data, md, deadline


class _Call:
    """One call; what it reports besides its responses, as `grpc.aio.Call` does (valid once it finished)."""

    def __init__(self, method: _Method, request, timeout: float | None, metadata) -> None:
        # the metadata with the caller's request id, from the caller's context (the call may run in another)
        self._method, self._request, self._timeout = method, request, timeout
        self._metadata = with_request_id(metadata)
        self._code, self._details = grpc.StatusCode.OK, ""
        self._trailers = grpc.aio.Metadata()

    def _ended(self, context: LocalContext | None, err: grpc.aio.AioRpcError | None = None) -> None:
        if err is not None:
            self._code, self._details, self._trailers = err.code(), err.details() or "", err.trailing_metadata()
        elif context is not None:
            self._trailers = grpc.aio.Metadata(*context.trailing_metadata())

    async def code(self) -> grpc.StatusCode:
        return self._code

    async def details(self) -> str:
        return self._details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return self._trailers


class _UnaryCall(_Call):
    """One unary call: it starts when made (as gRPC's); await it, as often as you like, for the response.

    The call is one task in a fresh context, as a server runs a handler (the caller's request id is in its
    metadata, taken when the call was made)."""

    def __init__(self, method: _Method, request, timeout: float | None, metadata) -> None:
        super().__init__(method, request, timeout, metadata)
        self._task = _spawn(self._call())

    def __await__(self):
        return self._task.__await__()  # cancelling the caller cancels the call, and so the handler

    def cancel(self) -> bool:
        return self._task.cancel()

    def done(self) -> bool:
        return self._task.done()

    async def _call(self):
        method = self._method
        try:
            data, md, deadline = method._start(self._request, self._timeout, self._metadata)
            retrying = _Retrying(deadline)
            while True:
                try:
                    return method._deserialize(await self._attempt(data, md, deadline))
                except grpc.aio.AioRpcError as err:
                    if not await retrying.again(err):
                        raise
        except grpc.aio.AioRpcError as err:
            self._ended(None, err)
            raise

    async def _attempt(self, data: bytes, md: tuple, deadline: float | None) -> bytes:
        handler = await self._method._handlers.handler(self._method._method, md)
        context = LocalContext(md, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                response = await handler.unary_unary(handler.request_deserializer(data), context)
        except TimeoutError:
            context.finish(cancelled=True)
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            context.finish(cancelled=True)
            raise
        except Exception as exc:  # noqa: BLE001 - it becomes the call's status, as on a server
            context.finish()
            raise _outcome(context, exc) from None
        context.finish()
        if context.code() not in (None, grpc.StatusCode.OK):
            raise _outcome(context, None)
        data = _checked(handler.response_serializer(response), "Received")
        self._ended(context)
        return data


class _StreamCall(_Call):
    """One server-streaming call: iterate it for the responses; `cancel()` stops the handler."""

    def __init__(self, method: _Method, request, timeout: float | None, metadata) -> None:
        super().__init__(method, request, timeout, metadata)
        self._task: asyncio.Task | None = None
        self._queue: asyncio.Queue | None = None  # the running attempt's (made before its task)
        self._cancelled = False
        self._finished = False  # the reader has seen the end, an error or the cancellation

    def cancel(self) -> bool:
        """Stop the call: the handler is cancelled (or, not started yet, never starts), and a reader gets
        `asyncio.CancelledError` (as from gRPC). False once the call has finished or was cancelled already."""
        if self._finished or self._cancelled:
            return False
        self._cancelled = True  # checked by the reader before each attempt and once its handler is found
        if self._task is not None:
            self._task.cancel()
        if self._queue is not None:
            while not self._queue.empty():  # what the handler sent ahead is dropped; the reader wakes up
                self._queue.get_nowait()
            self._queue.put_nowait(_CANCELLED)
        return True

    def _locally_cancelled(self) -> asyncio.CancelledError:
        self._ended(None, _rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"))
        return asyncio.CancelledError()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        method = self._method
        try:
            if self._cancelled:  # before the call was read: it never starts
                raise self._locally_cancelled()
            data, md, deadline = method._start(self._request, self._timeout, self._metadata)
            retrying, received = _Retrying(deadline), False
            while True:
                if self._cancelled:  # while a retry waited
                    raise self._locally_cancelled()
                context = LocalContext(md, deadline)
                queue = self._queue = asyncio.Queue(maxsize=16)  # flow control: the handler runs <= 16 ahead
                self._task = task = await self._serve(data, md, context, queue, deadline)
                try:
                    if self._cancelled:  # cancelled while the handler was looked up: it stops before it runs
                        raise self._locally_cancelled()
                    while True:
                        try:
                            async with asyncio.timeout_at(deadline):  # around the wait only, never a `yield`
                                item = await queue.get()
                        except TimeoutError:
                            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
                        if item is _END:
                            self._ended(context)
                            return
                        if item is _CANCELLED:
                            raise self._locally_cancelled()
                        if isinstance(item, grpc.aio.AioRpcError):
                            raise item
                        received = True
                        yield method._deserialize(item)
                except grpc.aio.AioRpcError as err:
                    # as gRPC: a stream is retried only while nothing was received (it is not committed yet)
                    if received or not await retrying.again(err):
                        raise
                finally:
                    task.cancel()
        except grpc.aio.AioRpcError as err:
            self._ended(None, err)
            raise
        finally:
            self._finished = True

    async def _serve(self, data: bytes, md: tuple, context: LocalContext, queue: asyncio.Queue,
                     deadline: float | None) -> asyncio.Task:
        handler = await self._method._handlers.handler(self._method._method, md)

        async def serve() -> None:
            try:
                async with asyncio.timeout_at(deadline):
                    async for item in handler.unary_stream(handler.request_deserializer(data), context):
                        await queue.put(_checked(handler.response_serializer(item), "Received"))
            except asyncio.CancelledError:  # the caller went away
                context.finish(cancelled=True)
                raise
            except TimeoutError:  # the deadline passed: the caller's wait says so
                context.finish(cancelled=True)
                return
            except grpc.aio.AioRpcError as err:  # a response over the size limit
                context.finish()
                await queue.put(err)
                return
            except Exception as exc:  # noqa: BLE001 - it becomes the call's status, as on a server
                context.finish()
                await queue.put(_outcome(context, exc))
                return
            context.finish()
            await queue.put(_outcome(context, None) if context.code() not in (None, grpc.StatusCode.OK) else _END)

        return _spawn(serve())


def _spawn(coro) -> asyncio.Task:
    """Run a handler in a task of its own, in a fresh context (as a server runs it: nothing of the caller's
    ContextVars); an outcome nobody waits for any more (the caller left) is not reported as unretrieved."""
    task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
    task.add_done_callback(_retrieve)
    return task


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
