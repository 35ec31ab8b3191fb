"""The OpenAI-compatible adapter on the wire (plain HTTP over aiohttp, its SSE decoder), a loopback server answering
with payloads written from the Chat Completions documentation:
https://platform.openai.com/docs/api-reference/chat-streaming (chunks, tool-call deltas, the usage chunk) and
https://platform.openai.com/docs/guides/error-codes (error bodies, Retry-After)."""

from __future__ import annotations

import json

import httpx2
import pytest

from services.inference.domain import FinishReason, Message, Role, TextDelta, ToolCallEvent, ToolChoice, ToolDef
from services.inference.providers.base import OTHER, RATE_LIMIT, SERVER, ProviderError
from services.inference.providers.openai_compat import env_proxy, sse_batches, sse_data
from tests.inference.hosted import Recorder, ask, core_with, sse, streamed

ROUTE = {"name": "gpt", "provider": "openai", "base_url": "http://upstream.test/v1", "api_key_env": "TEST_WIRE_KEY",
         "headers": {"X-Team": "parley"}, "max_retries": 0}
WEATHER = ToolDef("get_weather", "Current weather in a city.",
                  {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
USAGE = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30, "prompt_tokens_details": {"cached_tokens": 4}}


def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": choices, **extra}


def done_stream(events: list[dict]) -> httpx2.Response:
    response = sse([(None, e) for e in events])
    return httpx2.Response(200, headers=response.headers,
                           content=b"data:\n\n" + response.content + b"data: [DONE]\n\n")  # an empty event first


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("TEST_WIRE_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-7")


async def test_streamed_tool_call_fragments_are_assembled_and_usage_read_from_the_last_chunk():
    fn = {"name": "get_weather", "arguments": ""}
    recorder = Recorder(lambda r: done_stream([
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": fn}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "get_weather", "arguments": 'ty": "Porto"}'}}]}),
        chunk({}, "tool_calls"),
        chunk(None, usage=USAGE),
    ]))
    core = await core_with(ROUTE, recorder)
    out = await streamed(core, ask("gpt", Message(Role.USER, "Weather in Porto?"), tools=[WEATHER],
                                   tool_choice=ToolChoice.AUTO))
    (call,) = [e.call for e in out if isinstance(e, ToolCallEvent)]
    assert (call.id, call.name, json.loads(call.arguments_json)) == ("call_1", "get_weather", {"city": "Porto"})
    final = out[-1]
    assert final.finish_reason is FinishReason.TOOL_CALLS and final.tool_calls == [call]
    u = final.usage
    assert (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens, u.estimated) == (21, 9, 4, False)


async def test_the_request_carries_the_key_the_environment_and_the_route_headers():
    recorder = Recorder(lambda r: done_stream([chunk({"content": "Hi"}, "stop"), chunk(None, usage=USAGE)]))
    core = await core_with(ROUTE, recorder)
    out = await streamed(core, ask("gpt", max_tokens=12))
    assert "".join(e.text for e in out if isinstance(e, TextDelta)) == "Hi"
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("POST", "/v1/chat/completions")  # the route's path, kept
    h = request.headers
    assert (h["authorization"], h["openai-organization"], h["x-team"]) == ("Bearer sk-test", "org-7", "parley")
    assert h["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 12


async def test_an_error_object_inside_the_stream_is_a_provider_error():
    recorder = Recorder(lambda r: done_stream([{"error": {"message": "the model is overloaded", "type": "server"}}]))
    core = await core_with(ROUTE, recorder)
    with pytest.raises(ProviderError) as raised:
        await streamed(core.backends["gpt"].provider, ask("gpt"))
    assert (raised.value.kind, raised.value.message) == (OTHER, "the model is overloaded")


@pytest.mark.parametrize("stream", [True, False])
async def test_error_statuses_keep_kind_message_and_retry_after(stream):
    answers = iter([
        httpx2.Response(429, headers={"retry-after": "2"}, json={"error": {"message": "slow down", "type": "rate"}}),
        httpx2.Response(500, text="upstream exploded"),
    ])
    core = await core_with(ROUTE, Recorder(lambda r: next(answers)))
    provider = core.backends["gpt"].provider

    async def call():
        return await (streamed(provider, ask("gpt")) if stream else provider.generate(ask("gpt")))

    with pytest.raises(ProviderError) as limited:
        await call()
    assert (limited.value.kind, limited.value.message, limited.value.status, limited.value.retry_after_s) == \
        (RATE_LIMIT, "slow down", 429, 2.0)
    with pytest.raises(ProviderError) as failed:
        await call()
    assert (failed.value.kind, failed.value.message) == (SERVER, "Error code: 500")  # as the openai SDK said


async def test_a_success_that_is_not_an_event_stream_is_not_retried_as_a_network_failure():
    recorder = Recorder(lambda r: httpx2.Response(200, json={"choices": []}))
    core = await core_with(ROUTE, recorder)
    with pytest.raises(ProviderError) as raised:
        await streamed(core.backends["gpt"].provider, ask("gpt"))
    assert raised.value.kind == OTHER and not raised.value.retryable and "text/event-stream" in raised.value.message


async def pieces_of(*pieces: bytes):
    for piece in pieces:
        yield piece


async def decoded(*pieces: bytes) -> list[str]:
    return [data async for data in sse_data(pieces_of(*pieces))]


async def test_the_event_stream_decoder_follows_the_standard():
    """https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation"""
    body = (b": a comment\r\nevent: delta\r\ndata: one\r\ndata:two\r\nid: 7\r\n\r\n"  # CRLF; space after ':' optional
            b"data: three\rretry: 10\r\r"  # CR alone
            b"data\n\n"  # a field with no colon: empty data
            b"event: ping\n\n"  # no data: not dispatched
            b"data: {\"k\": \"a:b\"}\n\n"
            b"data: never finished\n")  # the body ends before the blank line: discarded
    assert await decoded(body) == ["one\ntwo", "three", "", '{"k": "a:b"}']
    # The same body in pieces of every size, CRLF pairs split between two pieces included.
    for size in (1, 2, 3, 5, 8):
        assert await decoded(*(body[i:i + size] for i in range(0, len(body), size))) == \
            ["one\ntwo", "three", "", '{"k": "a:b"}'], size


async def test_events_are_batched_by_the_piece_that_completes_them():
    async def batches(*pieces: bytes) -> list[list[str]]:
        return [events async for events in sse_batches(pieces_of(*pieces))]

    assert await batches(b"data: a\n\ndata: b\n\ndata: c", b"\n", b"\n", b": comment\n", b"data: d\n\ndata: e\n\n") \
        == [["a", "b"], ["c"], ["d", "e"]]  # a piece that completes no event gives no batch


async def test_text_that_arrives_together_leaves_as_one_delta_and_before_an_error():
    events = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
              chunk({"content": " there"}), chunk({}, "stop"), chunk(None, usage=USAGE)]
    whole = Recorder(lambda r: done_stream(events), piece=None)  # the body in one write: one read here
    out = await streamed((await core_with(ROUTE, whole)).backends["gpt"].provider, ask("gpt"))
    assert [type(e).__name__ for e in out] == ["TextDelta", "Finish"] and out[0].text == "Hello there"
    assert out[1].usage.completion_tokens == 9
    apart = Recorder(lambda r: done_stream(events), piece="event")  # read one by one: they leave one by one
    out = await streamed((await core_with(ROUTE, apart)).backends["gpt"].provider, ask("gpt"))
    assert [e.text for e in out if isinstance(e, TextDelta)] == ["Hel", "lo", " there"]

    failing = Recorder(lambda r: done_stream([chunk({"content": "partial"}), {"error": {"message": "overloaded"}}]),
                       piece=None)
    received = []
    with pytest.raises(ProviderError) as raised:
        async for event in (await core_with(ROUTE, failing)).backends["gpt"].provider.stream(ask("gpt")):
            received.append(event)
    assert [e.text for e in received] == ["partial"] and raised.value.message == "overloaded"


async def test_a_long_event_is_not_cut():
    text = "x" * 300_000  # longer than aiohttp's line limit for readline (2**16 bytes by default)
    recorder = Recorder(lambda r: done_stream([chunk({"content": text}, "stop"), chunk(None, usage=USAGE)]))
    core = await core_with(ROUTE, recorder)
    out = await streamed(core, ask("gpt"))
    assert "".join(e.text for e in out if isinstance(e, TextDelta)) == text


async def test_streams_reuse_one_connection_and_a_stream_stopped_early_does_not_poison_the_pool():
    peers = []

    def answer(request):
        peers.append(request.extensions.get("peer"))
        return done_stream([chunk({"content": "a"}), chunk({"content": "b"}, "stop"), chunk(None, usage=USAGE)])

    recorder = Recorder(answer, piece="event")  # read apart: one delta each, and an early stop leaves a body unread
    core = await core_with(ROUTE, recorder)
    provider = core.backends["gpt"].provider
    for _ in range(3):
        assert [type(e).__name__ for e in await streamed(provider, ask("gpt"))] == \
            ["TextDelta", "TextDelta", "Finish"]
    assert len(set(peers)) == 1, peers  # keep-alive: the body was read to its end after [DONE]
    events = aiter(provider.stream(ask("gpt")))
    assert isinstance(await anext(events), TextDelta)
    await events.aclose()  # the caller stops after the first delta (aiohttp pools the connection only if the
    out = await streamed(provider, ask("gpt"))  # body had all arrived): the next stream is whole either way
    assert "".join(e.text for e in out if isinstance(e, TextDelta)) == "ab"
    assert len(peers) == 5


def test_proxies_come_from_the_environment_once_per_route(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("https://api.openai.com/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.cluster.local")
    assert env_proxy("https://api.openai.com/v1") == "http://proxy.internal:3128"
    assert env_proxy("http://vllm.example:8000/v1") == "http://plain-proxy.internal:3128"
    assert env_proxy("http://vllm.gpu.cluster.local:8000/v1") is None  # NO_PROXY's domain suffix
    assert env_proxy("http://localhost:8000/v1") is None
