"""The Gemini adapter through the official `google-genai` SDK, its HTTP transport answering with
payloads written from Google's documented wire format:

- generateContent and streamGenerateContent (`?alt=sse`: each SSE `data:` is one
  GenerateContentResponse): https://ai.google.dev/api/generate-content
- usageMetadata (promptTokenCount, candidatesTokenCount, thoughtsTokenCount,
  cachedContentTokenCount): https://ai.google.dev/api/generate-content#UsageMetadata
- function calling (functionDeclarations with parametersJsonSchema, toolConfig.functionCallingConfig,
  functionCall / functionResponse parts): https://ai.google.dev/gemini-api/docs/function-calling
- countTokens ({"totalTokens": N}): https://ai.google.dev/api/tokens
- errors ({"error": {"code", "message", "status"}}): https://ai.google.dev/gemini-api/docs/troubleshooting
"""

from __future__ import annotations

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

MODEL = "gemini-2.5-flash"
ROUTE = {"name": "gemini", "provider": "gemini", "model": MODEL, "api_key_env": "PARLEY_TEST_GEMINI_KEY"}
WEATHER = ToolDef("get_weather", "Current weather in a city.",
                  {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("PARLEY_TEST_GEMINI_KEY", "gm-test")


def answer(parts: list[dict], finish: str | None, usage: dict | None) -> dict:
    candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    data = {"candidates": [candidate], "modelVersion": MODEL, "responseId": "mwZcaK2tBqfXz7IP6dOmwQw"}
    if usage:
        data["usageMetadata"] = usage
    return data


async def test_unary_text_counts_thinking_as_output_and_prices_it():
    usage = {"promptTokenCount": 8, "candidatesTokenCount": 12, "thoughtsTokenCount": 30,
             "cachedContentTokenCount": 4, "totalTokenCount": 50}
    recorder = Recorder(lambda r: httpx2.Response(200, json=answer(
        [{"text": "thinking...", "thought": True}, {"text": "Paris."}], "STOP", usage)))
    core = await core_with(ROUTE, recorder)
    r = await core.generate(ask("gemini", Message(Role.SYSTEM, "Answer briefly."),
                                Message(Role.USER, "Capital of France?"), max_tokens=100))
    assert r.text == "Paris." and r.finish_reason is FinishReason.STOP and r.provider == "gemini"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cached_prompt_tokens) == (8, 42, 4)
    # gemini-2.5-flash: $0.30 input, $0.03 cached input, $2.50 output (thinking included) per million
    assert r.usage.cost.usd == pytest.approx((4 * 0.30 + 4 * 0.03 + 42 * 2.50) / 1e6)
    (request,) = recorder.requests
    assert request.url.path.endswith(f"/models/{MODEL}:generateContent")  # /v1 in SDK 3.x, /v1beta before
    body = recorder.bodies[0]
    assert body["systemInstruction"]["parts"] == [{"text": "Answer briefly."}]
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Capital of France?"}]}]
    assert body["generationConfig"]["maxOutputTokens"] == 100


async def test_streamed_chunks_with_usage_on_the_last_one():
    chunks = [
        answer([{"text": "The sky "}], None, None),
        answer([{"text": "is blue."}], None, None),
        answer([{"text": ""}], "STOP", {"promptTokenCount": 6, "candidatesTokenCount": 5, "totalTokenCount": 11}),
    ]
    recorder = Recorder(lambda r: sse([(None, c) for c in chunks]))
    core = await core_with(ROUTE, recorder)
    out = await streamed(core, ask("gemini", Message(Role.USER, "Why is the sky blue?")))
    assert "".join(e.text for e in out if isinstance(e, TextDelta)) == "The sky is blue."
    final = out[-1]
    assert isinstance(final, Response) and final.text == "The sky is blue."
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (6, 5) and not final.usage.estimated
    assert recorder.requests[0].url.path.endswith(":streamGenerateContent")
    assert recorder.requests[0].url.params["alt"] == "sse"


async def test_streamed_function_call_with_forced_tool():
    chunks = [
        answer([{"functionCall": {"name": "get_weather", "args": {"city": "Lisbon"}}}], "STOP",
               {"promptTokenCount": 40, "candidatesTokenCount": 7, "totalTokenCount": 47}),
    ]
    recorder = Recorder(lambda r: sse([(None, c) for c in chunks]))
    core = await core_with(ROUTE, recorder)
    out = await streamed(core, ask("gemini", Message(Role.USER, "Weather in Lisbon?"), tools=[WEATHER],
                                   tool_choice=ToolChoice.REQUIRED, forced_tool="get_weather"))
    (call,) = [e.call for e in out if isinstance(e, ToolCallEvent)]
    assert call.name == "get_weather" and call.arguments_json == '{"city": "Lisbon"}' and call.id
    assert out[-1].finish_reason is FinishReason.TOOL_CALLS
    body = recorder.bodies[0]
    (declaration,) = body["tools"][0]["functionDeclarations"]
    assert (declaration["name"], declaration["description"]) == ("get_weather", "Current weather in a city.")
    # The SDK writes the proto field name; proto3 JSON accepts it as well as the camelCase JSON name.
    assert declaration.get("parametersJsonSchema", declaration.get("parameters_json_schema")) == WEATHER.parameters
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


async def test_function_responses_carry_the_tool_name():
    recorder = Recorder(lambda r: httpx2.Response(200, json=answer(
        [{"text": "It is 21 degrees."}], "STOP", {"promptTokenCount": 30, "candidatesTokenCount": 6})))
    core = await core_with(ROUTE, recorder)
    call = ToolCall("call_7", "get_weather", '{"city": "Rome"}')
    await core.generate(ask("gemini", Message(Role.USER, "Weather in Rome?"), Message(Role.ASSISTANT, "", (call,)),
                            Message(Role.TOOL, '{"temp_c": 21}', tool_call_id="call_7"), tools=[WEATHER]))
    contents = recorder.bodies[0]["contents"]
    assert contents[1] == {"role": "model", "parts": [
        {"functionCall": {"id": "call_7", "name": "get_weather", "args": {"city": "Rome"}}}]}
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"id": "call_7", "name": "get_weather", "response": {"output": {"temp_c": 21}}}}]}


async def test_overloaded_503_is_retried_then_unavailable():
    error = {"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                       "status": "UNAVAILABLE"}}
    recorder = Recorder(lambda r: httpx2.Response(503, json=error))
    core = await core_with({**ROUTE, "max_retries": 1}, recorder)
    with pytest.raises(Unavailable, match="gemini: server \\(HTTP 503\\): The model is overloaded"):
        await core.generate(ask("gemini"))
    assert len(recorder.requests) == 2


async def test_count_tokens_from_the_api():
    recorder = Recorder(lambda r: httpx2.Response(200, json={"totalTokens": 31}))
    core = await core_with(ROUTE, recorder)
    counted = await core.count_tokens("gemini", [Message(Role.USER, "The quick brown fox jumps over the lazy dog.")])
    assert (counted.prompt_tokens, counted.estimated, counted.context_window) == (31, False, 1_048_576)
    assert recorder.requests[0].url.path.endswith(f"/models/{MODEL}:countTokens")
