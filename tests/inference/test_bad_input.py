"""Bad input through real gRPC: the status code, the message, and the BadRequest field violations."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from parley.inference.v1 import inference_pb2 as pb
from tests.inference.conftest import LOCAL, TEST_N_CTX, collect, user, weather_tool

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def expect(call, code: grpc.StatusCode, *fragments: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    for fragment in fragments:
        assert fragment in err.details(), err.details()
    return err


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    return {}


def gen(messages=None, **kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[user("hello")] if messages is None else messages, **kwargs)


async def test_unknown_model_lists_the_available_ones(stub):
    await expect(stub.Generate(gen(model="gpt-9")), grpc.StatusCode.NOT_FOUND,
                 "model 'gpt-9' is not configured", f"available models: {LOCAL}")
    await expect(stub.CountTokens(pb.CountTokensRequest(model="nope", messages=[user("x")])),
                 grpc.StatusCode.NOT_FOUND, "available models")


async def test_no_messages(stub):
    err = await expect(stub.Generate(gen([])), INVALID, "messages: at least one message is required")
    assert violations(err) == {"messages": "at least one message is required"}
    await expect(stub.CountTokens(pb.CountTokensRequest()), INVALID, "at least one message")


@pytest.mark.parametrize("role", [pb.ROLE_UNSPECIFIED, 42])
async def test_bad_roles(stub, role):
    err = await expect(stub.Generate(gen([user("hi"), pb.Message(role=role, content="x")])), INVALID,
                       "messages[1].role: must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
    assert "messages[1].role" in violations(err)


async def test_tool_messages_need_a_tool_call_they_answer(stub):
    await expect(stub.Generate(gen([user("hi"), pb.Message(role=pb.ROLE_TOOL, content="42")])), INVALID,
                 "messages[1].tool_call_id: is required for a tool message")
    await expect(stub.Generate(gen([user("hi"), pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_x", content="1")])),
                 INVALID, "'call_x' answers no tool call of an earlier assistant message")


async def test_malformed_messages_are_all_reported(stub):
    messages = [
        pb.Message(role=pb.ROLE_USER, content="  "),
        pb.Message(role=pb.ROLE_ASSISTANT),
        pb.Message(role=pb.ROLE_USER, content="x", tool_calls=[pb.ToolCall(id="a", name="t", arguments_json="{}")]),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="b", name="t", arguments_json="{not json")]),
    ]
    err = await expect(stub.Generate(gen(messages)), INVALID, "messages[0].content: a user message must not be empty")
    assert set(violations(err)) == {"messages[0].content", "messages[1]", "messages[2].tool_calls",
                                    "messages[3].tool_calls[0].arguments_json"}


async def test_max_tokens_out_of_bounds(stub):
    await expect(stub.Generate(gen(sampling=pb.SamplingParams(max_tokens=-1))), INVALID,
                 "sampling.max_tokens: must not be negative")
    err = await expect(stub.Generate(gen(sampling=pb.SamplingParams(max_tokens=TEST_N_CTX + 1))), INVALID,
                       f"{TEST_N_CTX + 1} exceeds the context window of {LOCAL} ({TEST_N_CTX} tokens)")
    assert violations(err) == {"sampling.max_tokens": f"must be between 1 and {TEST_N_CTX}"}


async def test_prompt_over_the_context_window_names_the_sizes(stub):
    long = " ".join(f"word{i}" for i in range(1500))
    counted = await stub.CountTokens(pb.CountTokensRequest(messages=[user(long)]))
    assert counted.prompt_tokens > TEST_N_CTX
    await expect(stub.Generate(gen([user(long)])), INVALID,
                 f"the prompt is {counted.prompt_tokens} tokens; the context window of {LOCAL} is {TEST_N_CTX}")
    # A prompt that fits, but not with the completion asked for:
    medium = " ".join(f"w{i}" for i in range(250))
    fits = await stub.CountTokens(pb.CountTokensRequest(messages=[user(medium)]))
    room = TEST_N_CTX - fits.prompt_tokens
    await expect(stub.Generate(gen([user(medium)], sampling=pb.SamplingParams(max_tokens=room + 1))), INVALID,
                 f"the prompt is {fits.prompt_tokens} tokens and max_tokens is {room + 1}", f"at most {room}")


async def test_streams_fail_the_same_way(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub.StreamGenerate(pb.StreamGenerateRequest(messages=[], model=LOCAL)))
    assert info.value.code() == INVALID and "at least one message" in info.value.details()


async def test_bad_tool_definitions(stub):
    long_name = pb.ToolDefinition(name="t" * 65, description="x")
    dup = [weather_tool(), weather_tool()]
    not_object = pb.ToolDefinition(name="s", description="x")
    not_object.parameters.update({"type": "string"})
    broken = pb.ToolDefinition(name="b", description="x")
    broken.parameters.update({"type": "object", "properties": {"a": {"type": 5}}})
    spaced = pb.ToolDefinition(name="has space")
    err = await expect(stub.Generate(gen(tools=[long_name, *dup, not_object, broken, spaced])), INVALID,
                       "tools[0].name: is 65 characters long; the limit is 64")
    v = violations(err)
    assert v["tools[2].name"] == "'get_weather' is defined twice"
    assert v["tools[3].parameters"].startswith("must be a JSON schema of an object")
    assert v["tools[4].parameters"].startswith("is not a valid JSON schema")
    assert v["tools[5].name"] == "must contain only letters, digits, _ and -"


async def test_tool_choice_mistakes(stub):
    await expect(stub.Generate(gen(tool_choice=pb.TOOL_CHOICE_REQUIRED)), INVALID,
                 "tool_choice: TOOL_CHOICE_REQUIRED needs at least one tool")
    await expect(stub.Generate(gen(tools=[weather_tool()], forced_tool="get_weather")), INVALID,
                 "forced_tool: is only allowed with tool_choice TOOL_CHOICE_REQUIRED")
    await expect(stub.Generate(gen(tools=[weather_tool()], tool_choice=pb.TOOL_CHOICE_REQUIRED,
                                   forced_tool="send_email")), INVALID,
                 "forced_tool: 'send_email' is not among the tools (get_weather)")
    await expect(stub.Generate(gen(tool_choice=9)), INVALID, "tool_choice: unknown value 9")


async def test_sampling_out_of_range(stub):
    err = await expect(stub.Generate(gen(sampling=pb.SamplingParams(temperature=3, top_p=0,
                                                                    stop=["a", "b", "c", "d", "e"]))),
                       INVALID, "sampling.temperature: must be between 0 and 2")
    assert set(violations(err)) == {"sampling.temperature", "sampling.top_p", "sampling.stop"}


async def test_schema_the_local_grammar_cannot_express(stub):
    request = gen(sampling=pb.SamplingParams(max_tokens=8))
    request.response_schema.update({"type": "object", "properties": {"a": {"$ref": "https://example.com/x"}}})
    await expect(stub.Generate(request), INVALID, "response_schema: the local model cannot constrain its output")


async def test_list_models_rejects_foreign_page_tokens(stub):
    await expect(stub.ListModels(pb.ListModelsRequest(page_token="garbage")), INVALID,
                 "page_token: is not a token this server issued")
    await expect(stub.ListModels(pb.ListModelsRequest(page_size=5000)), INVALID, "page_size: must be at most 1000")
