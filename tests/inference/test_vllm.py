"""The vLLM adapter (the OpenAI-compatible adapter plus vLLM's own endpoints), a loopback server answering with
payloads written from vLLM's documented API (no GPU here to run vLLM itself):

- OpenAI-compatible server, extra request parameters and the tokenizer API (`POST /tokenize` ->
  {"count", "max_model_len", "tokens"}): https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html
- structured outputs (`structured_outputs: {"json": schema}`; `guided_json` before 0.10.2):
  https://docs.vllm.ai/en/latest/features/structured_outputs.html
- Prometheus metrics (`GET /metrics`, vllm:num_requests_running ...): https://docs.vllm.ai/en/latest/usage/metrics.html
- chat completion chunks and the usage chunk: https://platform.openai.com/docs/api-reference/chat-streaming
"""

from __future__ import annotations

import json

import httpx2
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.inference.domain import FinishReason, Message, Role, ToolCallEvent, ToolChoice, ToolDef
from services.inference.providers.toolcalls import call_schema
from services.inference.providers.vllm import VLLMProvider, vllm_collector
from tests.inference.hosted import Recorder, ask, core_with, sse, streamed

ROUTE = {"name": "qwen", "provider": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "base_url": "http://gpu:8000/v1"}
WEATHER = ToolDef("get_weather", "Current weather in a city.",
                  {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 0.25
"""


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": ROUTE["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def vllm(request: httpx2.Request) -> httpx2.Response:
    path = request.url.path
    if path == "/tokenize":
        return httpx2.Response(200, json={"count": 37, "max_model_len": 32768, "tokens": list(range(37)),
                                          "token_strs": None})
    if path == "/metrics":
        return httpx2.Response(200, text=METRICS, headers={"content-type": "text/plain; version=0.0.4"})
    body = json.loads(request.content)
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}' if "structured_outputs" in body or \
        "guided_json" in body else "Hello there"
    counts = {"prompt_tokens": 52, "completion_tokens": 17, "total_tokens": 69}
    if not body.get("stream"):
        return httpx2.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": ROUTE["model"], "usage": counts,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
    pieces = [text[:10], text[10:]]
    usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": ROUTE["model"],
             "choices": [], "usage": counts}
    return sse([(None, chunk({"role": "assistant", "content": ""}))]
               + [(None, chunk({"content": p})) for p in pieces]
               + [(None, chunk({}, "stop")), (None, usage)])


@pytest.mark.parametrize("field", ["structured_outputs", "guided_json"])
async def test_forced_tool_uses_guided_json_decoding(field):
    recorder = Recorder(vllm)
    core = await core_with({**ROUTE, "guided_decoding": field}, recorder)
    out = await streamed(core, ask("qwen", Message(Role.USER, "Weather in Paris?"), tools=[WEATHER],
                                   tool_choice=ToolChoice.REQUIRED, forced_tool="get_weather"))
    (call,) = [e.call for e in out if isinstance(e, ToolCallEvent)]
    assert (call.name, json.loads(call.arguments_json)) == ("get_weather", {"city": "Paris"})
    final = out[-1]
    assert final.finish_reason is FinishReason.TOOL_CALLS and final.text == ""  # the JSON is not shown as text
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.estimated) == (52, 17, False)
    body = recorder.bodies[0]
    schema = call_schema([WEATHER], "get_weather")
    assert (body["structured_outputs"] == {"json": schema}) if field == "structured_outputs" else \
        (body["guided_json"] == schema)
    assert "tools" not in body and "get_weather" in body["messages"][0]["content"]  # described in the system turn
    assert body["stream_options"] == {"include_usage": True}


async def test_plain_answers_stream_normally():
    recorder = Recorder(vllm)
    core = await core_with(ROUTE, recorder)
    r = await core.generate(ask("qwen", Message(Role.USER, "hi")))
    assert r.text == "Hello there" and r.provider == "vllm" and r.usage.prompt_tokens == 52


async def test_exact_token_counts_from_the_tokenize_endpoint():
    recorder = Recorder(vllm)
    core = await core_with(ROUTE, recorder)
    counted = await core.count_tokens("qwen", [Message(Role.USER, "How many tokens?")], [WEATHER])
    assert (counted.prompt_tokens, counted.context_window, counted.estimated) == (37, 32768, False)
    request = recorder.requests[0]
    assert request.url.path == "/tokenize"  # at the server root, not under /v1
    body = json.loads(request.content)
    assert body["add_generation_prompt"] is True and body["messages"][0]["content"] == "How many tokens?"
    assert body["tools"][0]["function"]["name"] == "get_weather"


async def test_vllm_metrics_are_read_and_exported():
    recorder = Recorder(vllm)
    core = await core_with(ROUTE, recorder)
    (model,) = await core.list_models()
    assert model.reachable and model.provider == "vllm"
    provider = core.backends["qwen"].provider
    assert isinstance(provider, VLLMProvider)
    assert provider.gauges == {"requests_running": 3.0, "requests_waiting": 1.0, "kv_cache_usage": 0.25}
    registry = CollectorRegistry()
    registry.register(vllm_collector([provider]))
    text = generate_latest(registry).decode()
    assert 'parley_inference_vllm_requests_running{model="qwen"} 3.0' in text
    assert 'parley_inference_vllm_kv_cache_usage{model="qwen"} 0.25' in text
