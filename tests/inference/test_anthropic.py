"""The Anthropic adapter through the official `anthropic` SDK, its HTTP transport answering with
payloads written from Anthropic's documented wire format:

- Messages API request/response: https://docs.anthropic.com/en/api/messages
- Streaming (SSE event names and order, text_delta, input_json_delta, ping, error events, usage in
  message_start and message_delta): https://docs.anthropic.com/en/api/messages-streaming
- Tool use blocks and tool_result: https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview
- Token counting (`POST /v1/messages/count_tokens` -> {"input_tokens": N}):
  https://docs.anthropic.com/en/api/messages-count-tokens
- Errors ({"type": "error", "error": {"type": "overloaded_error", ...}}, HTTP 529):
  https://docs.anthropic.com/en/api/errors
"""

from __future__ import annotations

import json

import httpx2
import pytest

from parley.runtime.errors import Unavailable
from services.inference.domain import (
    FinishReason,
    Message,
    Response,
    Role,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    ToolChoice,
    ToolDef,
)
from tests.inference.hosted import Recorder, ask, core_with, sse, streamed

MODEL = "claude-sonnet-4-5-20250929"
ROUTE = {"name": "claude", "provider": "anthropic", "model": MODEL, "api_key_env": "PARLEY_TEST_ANTHROPIC_KEY"}
WEATHER = ToolDef("get_weather", "Current weather in a city.",
                  {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("PARLEY_TEST_ANTHROPIC_KEY", "sk-ant-test")


def message(content: list[dict], stop_reason: str, usage: dict) -> dict:
    return {"id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant", "model": MODEL,
            "content": content, "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}


def start(usage: dict) -> tuple[str, dict]:
    return "message_start", {"type": "message_start", "message": message([], None, usage)}


async def test_unary_text_usage_with_prompt_cache_and_cost():
    usage = {"input_tokens": 21, "output_tokens": 9, "cache_creation_input_tokens": 100,
             "cache_read_input_tokens": 2000}
    recorder = Recorder(lambda r: httpx2.Response(
        200, json=message([{"type": "text", "text": "Hi! My name is Claude."}], "end_turn", usage)))
    core = await core_with(ROUTE, recorder)
    r = await core.generate(ask("claude", Message(Role.SYSTEM, "Be brief."), Message(Role.SYSTEM, "Be kind."),
                                Message(Role.USER, "Hello"), max_tokens=50))
    assert r.text == "Hi! My name is Claude." and r.finish_reason is FinishReason.STOP
    assert (r.model, r.provider) == ("claude", "anthropic")
    # prompt tokens = input + cache reads + cache writes (Anthropic reports them apart)
    assert (r.usage.prompt_tokens, r.usage.cached_prompt_tokens, r.usage.completion_tokens) == (2121, 2000, 9)
    assert not r.usage.estimated
    # claude-sonnet-4-5: $3 input, $0.30 cache read, $3.75 cache write, $15 output per million
    assert r.usage.cost.priced
    assert r.usage.cost.usd == pytest.approx((21 * 3 + 2000 * 0.3 + 100 * 3.75 + 9 * 15) / 1e6)
    (request,) = recorder.requests
    assert request.url.path == "/v1/messages"
    body = json.loads(request.content)
    assert body["system"] == "Be brief.\n\nBe kind." and body["max_tokens"] == 50 and body["model"] == MODEL
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    assert "temperature" not in body  # the current API rejects sampling parameters


async def test_streamed_text_and_usage_events():
    events = [
        start({"input_tokens": 25, "output_tokens": 1}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hello"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "!"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                           "usage": {"output_tokens": 15}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    recorder = Recorder(lambda r: sse(events))
    core = await core_with(ROUTE, recorder)
    out = await streamed(core, ask("claude"))
    # Deltas read together are sent together (core.coalesce); the text and its order are intact.
    assert "".join(e.text for e in out if isinstance(e, TextDelta)) == "Hello!"
    final = out[-1]
    assert isinstance(final, Response) and final.text == "Hello!" and final.finish_reason is FinishReason.LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (25, 15) and not final.usage.estimated
    assert final.usage.cost.usd == pytest.approx((25 * 3 + 15 * 15) / 1e6)
    assert json.loads(recorder.requests[0].content)["stream"] is True


async def test_streamed_tool_use_arrives_as_one_complete_call():
    events = [
        start({"input_tokens": 472, "output_tokens": 2}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Let me check."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
        *[("content_block_delta", {"type": "content_block_delta", "index": 1,
                                   "delta": {"type": "input_json_delta", "partial_json": part}})
          for part in ("", '{"city": ', '"San Fra', 'ncisco"}')],
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 89}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    recorder = Recorder(lambda r: sse(events))
    core = await core_with(ROUTE, recorder)
    out = await streamed(core, ask("claude", Message(Role.USER, "Weather in SF?"), tools=[WEATHER],
                                   tool_choice=ToolChoice.REQUIRED, forced_tool="get_weather"))
    calls = [e.call for e in out if isinstance(e, ToolCallEvent)]
    assert calls == [ToolCall("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", '{"city": "San Francisco"}')]
    assert out[-1].finish_reason is FinishReason.TOOL_CALLS and out[-1].usage.completion_tokens == 89
    body = recorder.bodies[0]
    assert body["tools"] == [{"name": "get_weather", "description": "Current weather in a city.",
                              "input_schema": WEATHER.parameters}]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather"}


async def test_tool_results_are_sent_as_tool_result_blocks():
    recorder = Recorder(lambda r: httpx2.Response(200, json=message(
        [{"type": "text", "text": "It is 18°C."}], "end_turn", {"input_tokens": 50, "output_tokens": 6})))
    core = await core_with(ROUTE, recorder)
    call = ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')
    await core.generate(ask("claude", Message(Role.USER, "Weather in Paris?"),
                            Message(Role.ASSISTANT, "Checking.", (call,)),
                            Message(Role.TOOL, '{"temp_c": 18}', tool_call_id="toolu_1", name="get_weather"),
                            tools=[WEATHER]))
    body = recorder.bodies[0]
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]}
    assert body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp_c": 18}'}]}
    assert body["tool_choice"] == {"type": "auto"}


async def test_overloaded_529_is_retried():
    answers = iter([
        httpx2.Response(529, json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        httpx2.Response(200, json=message([{"type": "text", "text": "ok"}], "end_turn",
                                          {"input_tokens": 3, "output_tokens": 1})),
    ])
    recorder = Recorder(lambda r: next(answers))
    core = await core_with({**ROUTE, "max_retries": 1}, recorder)
    r = await core.generate(ask("claude"))
    assert r.text == "ok" and len(recorder.requests) == 2


async def test_overloaded_every_time_is_unavailable():
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    recorder = Recorder(lambda r: httpx2.Response(529, json=overloaded))
    core = await core_with({**ROUTE, "max_retries": 2}, recorder)
    with pytest.raises(Unavailable, match="claude: server \\(HTTP 529\\): Overloaded"):
        await core.generate(ask("claude"))
    assert len(recorder.requests) == 3


async def test_count_tokens_uses_the_counting_endpoint():
    recorder = Recorder(lambda r: httpx2.Response(200, json={"input_tokens": 14}))
    core = await core_with(ROUTE, recorder)
    counted = await core.count_tokens("claude", [Message(Role.USER, "Hello, world")], [WEATHER])
    assert (counted.prompt_tokens, counted.estimated, counted.context_window) == (14, False, 200_000)
    assert recorder.requests[0].url.path == "/v1/messages/count_tokens"
    assert recorder.bodies[0]["tools"][0]["name"] == "get_weather"


async def test_an_error_event_mid_stream_ends_the_stream_with_unavailable():
    events = [
        start({"input_tokens": 10, "output_tokens": 1}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Once upon"}}),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ]
    recorder = Recorder(lambda r: sse(events))
    core = await core_with({**ROUTE, "max_retries": 0}, recorder)
    seen = []
    with pytest.raises(Unavailable, match="claude failed during the answer: .*Overloaded") as info:
        async for event in core.stream(ask("claude")):
            seen.append(event)
    assert [e.text for e in seen] == ["Once upon"]  # what was sent stays sent; no silent fallback after it
    assert info.value.reason == "PROVIDER_FAILED_MID_STREAM"


async def test_metrics_count_tokens_cost_latency_and_errors():
    from parley.runtime.metrics import Metrics

    answers = iter([
        httpx2.Response(529, json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        sse([start({"input_tokens": 25, "output_tokens": 1}),
             ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": "Hi"}}),
             ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 15}}),
             ("message_stop", {"type": "message_stop"})]),
    ])
    metrics = Metrics()
    core = await core_with({**ROUTE, "max_retries": 0, "fallbacks": []}, Recorder(lambda r: next(answers)), metrics)
    with pytest.raises(Unavailable):
        await core.generate(ask("claude"))
    await streamed(core, ask("claude"))
    sample = metrics.registry.get_sample_value
    labels = {"model": "claude", "provider": "anthropic"}
    assert sample("parley_inference_tokens_total", {**labels, "kind": "prompt"}) == 25
    assert sample("parley_inference_tokens_total", {**labels, "kind": "completion"}) == 15
    assert sample("parley_inference_cost_usd_total", labels) == pytest.approx((25 * 3 + 15 * 15) / 1e6)
    assert sample("parley_inference_provider_errors_total", {**labels, "kind": "server"}) == 1
    assert sample("parley_inference_time_to_first_token_seconds_count", labels) == 1
    assert sample("parley_inference_calls_total", {**labels, "priced": "true", "estimated": "false"}) == 1
