"""In-process calls between co-hosted services (`parley.runtime.inprocess`): the same behaviour as a gRPC call.

Most tests run twice against one real server (memory and inference services, the real PostgreSQL and an
instant OpenAI-compatible upstream): once over a real gRPC channel, once over the server's in-process channel,
and assert the same outcome of both: responses, status codes and details, `google.rpc.Status` details, the
request id in the trailers, deadlines, cancellation, the retry policy and the message size limit.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bench.inference.upstream import Upstream
from parley.chat.v1 import chat_pb2 as cpb
from parley.chat.v1 import chat_pb2_grpc
from parley.inference.v1 import inference_pb2 as ipb
from parley.inference.v1 import inference_pb2_grpc
from parley.memory.v1 import memory_pb2 as mpb
from parley.memory.v1 import memory_pb2_grpc
from parley.runtime import inprocess
from parley.runtime.clients import MAX_MESSAGE_BYTES, RETRY_POLICY, make_channel
from parley.runtime.errors import Unavailable
from parley.runtime.interceptors import REQUEST_ID, REQUEST_ID_KEY, RETRY_PUSHBACK_KEY
from services.memory import store as store_module
from tests.conftest import eventually

KINDS = ["grpc", "inprocess"]
CREATE = store_module.MemoryStore.create_conversation


@pytest.fixture(scope="module")
async def upstream():
    server = await Upstream(tokens=6).start()
    yield server
    await server.close()


def route(upstream: Upstream) -> dict:
    return {"name": "instant", "provider": "openai", "base_url": upstream.base_url, "api_key_env": "PATH",
            "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}


@pytest.fixture(scope="module")
async def app(start_stack, upstream):
    inference = {"routes": [route(upstream)], "default_model": "instant", "local_enabled": False}
    async with start_stack(["memory", "inference"], inference=inference) as running_app:
        yield running_app


@pytest.fixture(scope="module")
async def channels(app):
    remote = make_channel(app.address)
    yield {"grpc": remote, "inprocess": app.server.local_channel()}
    await remote.close()


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def memory(channels, kind) -> memory_pb2_grpc.MemoryServiceStub:
    return memory_pb2_grpc.MemoryServiceStub(channels[kind])


@pytest.fixture
def inference(channels, kind) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(channels[kind])


def requests_counted(app, method: str, code: str, service: str = "parley.memory.v1.MemoryService") -> float:
    return app.metrics.registry.get_sample_value(
        "parley_grpc_requests_total", {"service": service, "method": method, "code": code}) or 0.0


async def test_a_call_is_answered_counted_and_carries_the_request_id(app, memory, kind):
    before = requests_counted(app, "CreateConversation", "OK")
    token = REQUEST_ID.set(f"rid-{kind}")
    try:
        call = memory.CreateConversation(mpb.CreateConversationRequest(user_id=f"inproc-{kind}", title="hello"))
        created = await call
        trailers = await call.trailing_metadata()
    finally:
        REQUEST_ID.reset(token)
    assert created.conversation.title == "hello" and created.conversation.user_id == f"inproc-{kind}"
    assert dict(trailers)[REQUEST_ID_KEY] == f"rid-{kind}", "the caller's request id went in and came back"
    assert await call.code() == grpc.StatusCode.OK
    # the server's interceptor counted it (a gRPC server does so once the call ended, maybe after the answer)
    await eventually(lambda: requests_counted(app, "CreateConversation", "OK") == before + 1)
    got = await memory.GetConversation(mpb.GetConversationRequest(
        user_id=f"inproc-{kind}", conversation_id=created.conversation.conversation_id))
    assert got.conversation == created.conversation


async def test_the_access_log_line_names_the_peer(app, memory, kind, caplog):
    """A gRPC call is logged with the caller's address, an in-process one as `inproc:`."""
    caplog.set_level(logging.INFO, logger="parley.rpc")
    request_id = f"peer-{kind}-{uuid.uuid4()}"
    token = REQUEST_ID.set(request_id)
    try:
        await memory.CreateConversation(mpb.CreateConversationRequest(user_id=f"peer-{kind}"))
    finally:
        REQUEST_ID.reset(token)

    def line() -> dict | None:  # structlog hands the stdlib its event dict
        return next((r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "rpc"
                     and r.msg.get("request_id") == request_id), None)

    await eventually(lambda: line() is not None)  # logged once the call ended (gRPC: after the answer went out)
    logged = line()
    assert logged["method"] == "CreateConversation" and logged["code"] == "OK"
    if kind == "inprocess":
        assert logged["peer"] == inprocess.PEER
    else:
        assert logged["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:")), logged["peer"]


async def test_a_call_runs_once_however_often_it_is_awaited(app, memory, kind):
    before = requests_counted(app, "CreateConversation", "OK")
    call = memory.CreateConversation(mpb.CreateConversationRequest(user_id=f"twice-{kind}"))
    first, second = await call, await call
    assert first == second
    await eventually(lambda: requests_counted(app, "CreateConversation", "OK") == before + 1)
    listed = await memory.ListConversations(mpb.ListConversationsRequest(user_id=f"twice-{kind}"))
    assert len(listed.conversations) == 1


async def test_errors_keep_their_code_message_and_status_details(app, memory, kind):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.GetConversation(mpb.GetConversationRequest(user_id="x", conversation_id="not-a-uuid"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conversation_id" in info.value.details()
    status = rpc_status.from_call(info.value)
    reasons = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            reasons.add(error_info.reason)
    assert reasons == {"INVALID_ARGUMENT"}
    assert REQUEST_ID_KEY in dict(info.value.trailing_metadata())

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.GetConversation(mpb.GetConversationRequest(
            user_id="x", conversation_id="00000000-0000-4000-8000-000000000000"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_crash_is_internal_without_its_details(memory, monkeypatch):
    async def broken(self, *args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(store_module.MemoryStore, "create_conversation", broken)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.CreateConversation(mpb.CreateConversationRequest(user_id="crash"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details()


async def test_the_handler_runs_in_a_context_of_its_own(memory, monkeypatch, kind):
    """As on a server: the caller's ContextVars are not the handler's, except the request id, which travels."""
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    seen: dict[str, str | None] = {}

    async def peek(self, *args, **kwargs):
        seen["marker"], seen["request_id"] = marker.get(), REQUEST_ID.get()
        marker.set("set by the handler")
        return await CREATE(self, *args, **kwargs)

    monkeypatch.setattr(store_module.MemoryStore, "create_conversation", peek)
    marker.set("set by the caller")
    token = REQUEST_ID.set(f"ctx-{kind}")
    try:
        await memory.CreateConversation(mpb.CreateConversationRequest(user_id="ctx"))
    finally:
        REQUEST_ID.reset(token)
    assert seen == {"marker": "unset", "request_id": f"ctx-{kind}"}
    assert marker.get() == "set by the caller", "nothing leaks back either"


def stall_create(monkeypatch) -> tuple[asyncio.Event, asyncio.Event]:
    """CreateConversation's handler hangs; (started, cancelled) say when it began and when it was cancelled."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(self, *args, **kwargs):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(store_module.MemoryStore, "create_conversation", slow)
    return started, cancelled


async def test_a_deadline_fails_the_call_and_cancels_the_handler(app, memory, monkeypatch, kind):
    started, cancelled = stall_create(monkeypatch)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.CreateConversation(mpb.CreateConversationRequest(user_id="slow"), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert started.is_set()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_a_caller_that_goes_away_cancels_the_handler(memory, monkeypatch):
    started, cancelled = stall_create(monkeypatch)
    caller = asyncio.ensure_future(memory.CreateConversation(mpb.CreateConversationRequest(user_id="gone")))
    await asyncio.wait_for(started.wait(), 5)
    caller.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)


def script_create(monkeypatch, *failures: BaseException) -> list[int]:
    """CreateConversation's store call raises each of `failures` in turn, then runs; returns its attempts."""
    attempts: list[int] = []

    async def scripted(self, *args, **kwargs):
        attempts.append(1)
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]
        return await CREATE(self, *args, **kwargs)

    monkeypatch.setattr(store_module.MemoryStore, "create_conversation", scripted)
    return attempts


async def test_the_retry_policy_retries_a_lost_backend_but_not_a_final_unavailable(memory, monkeypatch):
    """UNAVAILABLE from infrastructure (a connection lost) is retried; the UNAVAILABLE a service raises after its
    own retries carries a negative pushback and is not."""
    attempts = script_create(monkeypatch, ConnectionResetError("the backend went away"))
    created = await memory.CreateConversation(mpb.CreateConversationRequest(user_id="flaky"))
    assert created.conversation.conversation_id and len(attempts) == 2

    attempts = script_create(monkeypatch, Unavailable("no replica could serve"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.CreateConversation(mpb.CreateConversationRequest(user_id="final"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and len(attempts) == 1
    assert dict(info.value.trailing_metadata())[RETRY_PUSHBACK_KEY] == "-1"

    attempts = script_create(monkeypatch, *[ConnectionResetError("the backend stays away")] * 10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.CreateConversation(mpb.CreateConversationRequest(user_id="down"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(attempts) == RETRY_POLICY["maxAttempts"]


async def test_an_oversized_message_is_refused_and_nothing_is_stored(app, memory, kind):
    user = f"huge-{kind}"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.CreateConversation(mpb.CreateConversationRequest(user_id=user, title="x" * (MAX_MESSAGE_BYTES + 1)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listed = await memory.ListConversations(mpb.ListConversationsRequest(user_id=user))
    assert list(listed.conversations) == []


async def test_a_stream_delivers_every_event_then_usage(app, inference, kind):
    request = ipb.StreamGenerateRequest(model="instant", messages=[ipb.Message(role=2, content="Hi")])
    events = [e async for e in inference.StreamGenerate(request)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "final" and "final" not in kinds[:-1], kinds
    assert "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta") == "tok " * 6
    usage = events[-1].final.response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 6)


async def test_a_stream_keeps_its_errors_deadline_and_cancellation(app, inference, upstream, kind):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [e async for e in inference.StreamGenerate(ipb.StreamGenerateRequest(
            model="nope", messages=[ipb.Message(role=2, content="Hi")]))]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "available models: instant" in info.value.details()

    def ended(*codes: str) -> float:
        return sum(requests_counted(app, "StreamGenerate", c, "parley.inference.v1.InferenceService") for c in codes)

    upstream.delay_s = 30
    try:
        request = ipb.StreamGenerateRequest(model="instant", messages=[ipb.Message(role=2, content="Hi")])
        before = ended("CANCELLED", "DEADLINE_EXCEEDED")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [e async for e in inference.StreamGenerate(request, timeout=0.3)]
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: ended("CANCELLED", "DEADLINE_EXCEEDED") == before + 1)  # the handler stopped

        before = ended("CANCELLED")
        call = inference.StreamGenerate(request)
        reader = asyncio.ensure_future(anext(aiter(call), None))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await eventually(lambda: ended("CANCELLED") == before + 1)

        call = inference.StreamGenerate(request)  # cancelled before it is read
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await anext(aiter(call))
    finally:
        upstream.delay_s = 0


async def test_a_stream_cancelled_while_its_handler_is_looked_up_never_runs(app, monkeypatch):
    """cancel() after the reader started the call but before its handler was found (the interceptors' lookup is
    awaited): the handler never runs and the reader gets CancelledError, as over gRPC; a second cancel() and a
    cancel() of a finished call answer False."""
    channel = app.server.local_channel()
    handlers = channel._handlers
    looking_up, release, ran = asyncio.Event(), asyncio.Event(), []
    real = handlers.handler

    async def slow_lookup(method, metadata):
        looking_up.set()
        await release.wait()
        handler = await real(method, metadata)

        def unary_stream(request, context):
            ran.append(method)
            return handler.unary_stream(request, context)

        return handler._replace(unary_stream=unary_stream)

    monkeypatch.setattr(handlers, "handler", slow_lookup)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = ipb.StreamGenerateRequest(model="instant", messages=[ipb.Message(role=2, content="Hi")])
    call = stub.StreamGenerate(request)
    reader = asyncio.ensure_future(anext(aiter(call), None))
    await asyncio.wait_for(looking_up.wait(), 5)
    assert call.cancel()
    assert not call.cancel(), "cancelled already"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reader, 5)
    await asyncio.sleep(0.1)
    assert ran == [], "the handler must not start after the call was cancelled"
    assert await call.code() == grpc.StatusCode.CANCELLED

    finished = stub.StreamGenerate(request)  # the same lookup, let through at once
    events = [e async for e in finished]
    assert events[-1].WhichOneof("event") == "final" and ran == ["/parley.inference.v1.InferenceService/StreamGenerate"]
    assert not finished.cancel(), "a finished call cannot be cancelled"


async def test_a_stopped_server_answers_unavailable_in_process(start_stack):
    async with start_stack(["memory"]) as running_app:
        channel = running_app.server.local_channel()
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        assert (await stub.CreateConversation(mpb.CreateConversationRequest(user_id="stop"))).conversation
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateConversation(mpb.CreateConversationRequest(user_id="stop"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("in_process", [True, False])
async def test_co_hosted_services_call_each_other_in_process_unless_configured_not_to(
        start_stack, upstream, monkeypatch, in_process):
    """A turn of the chat service calls memory and inference through the in-process channel when they share its
    process (`parley up`), and over gRPC with PARLEY_INPROCESS_CALLS=false; the answer is the same."""
    called: list[str] = []
    original = inprocess.LocalHandlers.handler

    async def counting(self, method, metadata):
        called.append(method)
        return await original(self, method, metadata)

    monkeypatch.setattr(inprocess.LocalHandlers, "handler", counting)
    inference = {"routes": [route(upstream)], "default_model": "instant", "local_enabled": False}
    async with start_stack(["memory", "inference", "tools", "chat"], inference=inference,
                           inprocess_calls=in_process) as running_app:
        channel = make_channel(running_app.address)
        try:
            r = await chat_pb2_grpc.ChatServiceStub(channel).Chat(cpb.ChatRequest(
                user_id=f"cohost-{uuid.uuid4().hex[:8]}", message="Hello"))
        finally:
            await channel.close()
    assert r.response == ("tok " * 6).strip() and r.tokens_used == 17
    if in_process:
        assert {"/parley.memory.v1.MemoryService/AppendMessages",
                "/parley.inference.v1.InferenceService/Generate"} <= set(called), called
    else:
        assert called == []
