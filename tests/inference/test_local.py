"""The local provider through real gRPC: real SmolLM2 text, streamed and unary, exact token counts,
grammar-constrained tool calls and JSON answers."""

from __future__ import annotations

import json

import jsonschema
from google.protobuf import json_format

from parley.inference.v1 import inference_pb2 as pb
from tests.inference.conftest import LOCAL, TEST_N_CTX, collect, user, weather_tool

CAPITAL = [user("What is the capital of France? Answer in one word.")]


async def test_generate_real_text_with_exact_usage_and_free_cost(stub):
    r = await stub.Generate(pb.GenerateRequest(messages=CAPITAL, sampling=pb.SamplingParams(max_tokens=12,
                                                                                          temperature=0)))
    assert r.model == LOCAL and r.provider == "local" and not r.fallbacks_tried
    assert r.message.role == pb.ROLE_ASSISTANT and r.message.content.strip()
    assert "paris" in r.message.content.lower()
    u = r.usage
    assert not u.estimated
    assert 0 < u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    counted = await stub.CountTokens(pb.CountTokensRequest(messages=CAPITAL))
    assert u.prompt_tokens == counted.prompt_tokens and not counted.estimated  # the same tokenizer and template
    assert counted.context_window == TEST_N_CTX
    assert u.cost.priced and u.cost.cost_usd == 0  # the local model is free, and says so
    assert r.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert 0 < r.timing.time_to_first_token_ms <= r.timing.total_ms


async def test_stream_deltas_then_one_final_event_with_usage(stub):
    request = pb.StreamGenerateRequest(messages=[user("Write a long story about a dragon.")],
                                       sampling=pb.SamplingParams(max_tokens=16, temperature=0))
    events, final = await collect(stub.StreamGenerate(request))
    deltas = [e.delta.text for e in events if e.WhichOneof("event") == "delta"]
    assert len(deltas) >= 3  # token by token, not one blob
    assert "".join(deltas) == final.message.content
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 16
    assert final.timing.decode_tokens_per_second > 0
    assert 0 < final.timing.time_to_first_token_ms < final.timing.total_ms


async def test_greedy_and_seeded_sampling_are_reproducible(stub):
    def request(**sampling):
        return pb.GenerateRequest(messages=[user("Name three colours.")], sampling=pb.SamplingParams(**sampling))

    a = await stub.Generate(request(max_tokens=8, temperature=0.9, seed=42))
    b = await stub.Generate(request(max_tokens=8, temperature=0.9, seed=42))
    assert a.message.content == b.message.content


async def test_stop_sequence_cuts_the_answer(stub):
    r = await stub.Generate(pb.GenerateRequest(
        messages=[user("Count from 1 to 10, separated by commas.")],
        sampling=pb.SamplingParams(max_tokens=30, temperature=0, stop=["4"])))
    assert "4" not in r.message.content and r.finish_reason == pb.FINISH_REASON_STOP


async def test_forced_tool_yields_one_schema_valid_call(stub):
    tool = weather_tool()
    schema = json_format.MessageToDict(tool.parameters)
    request = pb.StreamGenerateRequest(messages=[user("Is it raining in Lisbon?")], tools=[tool],
                                       tool_choice=pb.TOOL_CHOICE_REQUIRED, forced_tool="get_weather",
                                       sampling=pb.SamplingParams(max_tokens=48, temperature=0))
    events, final = await collect(stub.StreamGenerate(request))
    calls = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id
    jsonschema.validate(json.loads(calls[0].arguments_json), schema)
    assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert list(final.message.tool_calls) == calls and final.usage.completion_tokens > 0


async def test_required_tool_picks_one_of_the_tools_with_valid_arguments(stub):
    clock = pb.ToolDefinition(name="get_time", description="Current time in a timezone.")
    clock.parameters.update({"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                             "required": ["timezone"]})
    tools = [weather_tool(), clock]
    r = await stub.Generate(pb.GenerateRequest(messages=[user("What time is it in Tokyo?")], tools=tools,
                                               tool_choice=pb.TOOL_CHOICE_REQUIRED,
                                               sampling=pb.SamplingParams(max_tokens=48, temperature=0)))
    (call,) = r.message.tool_calls
    schemas = {t.name: json_format.MessageToDict(t.parameters) for t in tools}
    jsonschema.validate(json.loads(call.arguments_json), schemas[call.name])


async def test_tool_result_round_trip_is_accepted(stub):
    messages = [
        user("Weather in Oslo?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="call_1", name="get_weather",
                                                                   arguments_json='{"city":"Oslo","unit":"c"}')]),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", name="get_weather", content='{"temp_c": 3}'),
    ]
    r = await stub.Generate(pb.GenerateRequest(messages=messages, tools=[weather_tool()],
                                               tool_choice=pb.TOOL_CHOICE_NONE,
                                               sampling=pb.SamplingParams(max_tokens=12, temperature=0)))
    assert r.message.content and not r.message.tool_calls


async def test_response_schema_constrains_the_answer(stub):
    request = pb.GenerateRequest(messages=[user("Give a city and its country.")],
                                 sampling=pb.SamplingParams(max_tokens=40, temperature=0))
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    request.response_schema.update(schema)
    r = await stub.Generate(request)
    jsonschema.validate(json.loads(r.message.content), schema)


async def test_auto_tool_choice_answers_or_calls_with_valid_arguments(stub):
    tool = weather_tool()
    r = await stub.Generate(pb.GenerateRequest(messages=[user("What is the weather in Rome? Use the tool.")],
                                               tools=[tool], tool_choice=pb.TOOL_CHOICE_AUTO,
                                               sampling=pb.SamplingParams(max_tokens=48, temperature=0)))
    if r.message.tool_calls:  # the model chose to call: the arguments were written under the grammar
        (call,) = r.message.tool_calls
        jsonschema.validate(json.loads(call.arguments_json), json_format.MessageToDict(tool.parameters))
        assert r.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    else:
        assert r.message.content and "<tool_call>" not in r.message.content


async def test_a_cancelled_stream_frees_the_model(stub):
    call = stub.StreamGenerate(pb.StreamGenerateRequest(messages=[user("Tell a very long story.")],
                                                        sampling=pb.SamplingParams(max_tokens=400)))
    async for event in call:
        if event.WhichOneof("event") == "delta":
            break
    call.cancel()
    # The worker thread stops at its next token and gives the model back: the next call is served at once.
    r = await stub.Generate(pb.GenerateRequest(messages=CAPITAL, sampling=pb.SamplingParams(max_tokens=4)),
                            timeout=60)
    assert r.usage.completion_tokens <= 4


async def test_list_models_shows_the_local_model_priced_at_zero(stub):
    r = await stub.ListModels(pb.ListModelsRequest())
    (model,) = [m for m in r.models if m.name == LOCAL]
    assert model.provider == "local" and model.is_default and model.reachable
    assert model.context_window == TEST_N_CTX and model.HasField("pricing")
    assert model.pricing.input_per_mtok == 0 and model.pricing.output_per_mtok == 0


async def test_the_waiting_line_is_bounded():
    import asyncio

    import grpc
    import pytest

    from parley.runtime.errors import ResourceExhausted
    from services.inference.providers.llama_engine import LlamaEngine, Outcome, Params
    from tests.inference.conftest import GGUF

    engine = await asyncio.to_thread(LlamaEngine, str(GGUF), 512, 1, 1, 0)
    try:
        tokens = engine.tokenizer.tokenize("<|im_start|>user\nCount to one hundred.<|im_end|>\n<|im_start|>assistant\n")
        first = engine.generate(tokens, Params(max_tokens=64), Outcome())
        await anext(first)  # holds the only instance
        with pytest.raises(ResourceExhausted, match="the local model is busy") as info:
            await anext(engine.generate(tokens, Params(max_tokens=4), Outcome()))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_after_s
        await first.aclose()
        outcome = Outcome()
        assert [p async for p in engine.generate(tokens, Params(max_tokens=3, temperature=0), outcome)]
        assert outcome.completion_tokens == 3
    finally:
        await asyncio.to_thread(engine.close)
