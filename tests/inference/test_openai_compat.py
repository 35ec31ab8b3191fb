"""The OpenAI-compatible path (plain HTTP over httpx2) against real servers on loopback:
llama.cpp's own OpenAI-compatible server serving the same GGUF, and the instant upstream."""

from __future__ import annotations

import json

import jsonschema
import pytest
from google.protobuf import json_format

from parley.inference.v1 import inference_pb2 as pb
from tests.inference.conftest import GGUF, channel_stub, collect, settings, user, weather_tool

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "cached_input_per_mtok": 0.5}


@pytest.fixture(scope="module")
async def compat(start_stack, llama_server, upstream):
    """The service with two OpenAI-compatible routes: llama.cpp's server, and the instant upstream."""
    routes = [
        {"name": "llama-server", "provider": "openai", "model": "smollm2-server", "base_url": llama_server,
         "tokenizer_gguf": str(GGUF), "timeout_s": 120},
        {"name": "instant", "provider": "openai", "base_url": upstream.base_url, "pricing": PRICE},
    ]
    async with start_stack(["inference"], inference=settings(routes=routes)) as app:
        channel, stub = await channel_stub(app.address)
        yield stub
        await channel.close()


async def test_streaming_text_from_llama_cpp_server(compat):
    request = pb.StreamGenerateRequest(model="llama-server", messages=[user("Say hello to Ana.")],
                                       sampling=pb.SamplingParams(max_tokens=12, temperature=0))
    events, final = await collect(compat.StreamGenerate(request))
    deltas = [e.delta.text for e in events if e.WhichOneof("event") == "delta"]
    assert len(deltas) >= 2 and "".join(deltas) == final.message.content
    assert final.model == "llama-server" and final.provider == "openai"
    # llama-cpp-python's server ignores stream_options.include_usage: the usage is counted with the
    # route's tokenizer (the same GGUF) and marked estimated; the server-side unary count agrees.
    assert final.usage.estimated and final.usage.completion_tokens > 0
    unary = await compat.Generate(pb.GenerateRequest(model="llama-server", messages=[user("Say hello to Ana.")],
                                                     sampling=pb.SamplingParams(max_tokens=12, temperature=0)))
    assert not unary.usage.estimated
    assert final.usage.prompt_tokens == unary.usage.prompt_tokens
    assert unary.message.content == final.message.content  # greedy: same text both ways
    assert not unary.usage.cost.priced  # no price configured for this route: unpriced, not $0


async def test_forced_tool_call_through_llama_cpp_server(compat):
    tool = weather_tool()
    schema = json_format.MessageToDict(tool.parameters)
    for rpc in ("Generate", "StreamGenerate"):
        kwargs = dict(model="llama-server", messages=[user("Weather in Porto?")], tools=[tool],
                      tool_choice=pb.TOOL_CHOICE_REQUIRED, forced_tool="get_weather",
                      sampling=pb.SamplingParams(max_tokens=64, temperature=0))
        if rpc == "Generate":
            final = await compat.Generate(pb.GenerateRequest(**kwargs))
            calls = list(final.message.tool_calls)
        else:
            events, final = await collect(compat.StreamGenerate(pb.StreamGenerateRequest(**kwargs)))
            calls = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call"]
            assert list(final.message.tool_calls) == calls
        assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id, rpc
        jsonschema.validate(json.loads(calls[0].arguments_json), schema)
        assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS, rpc


async def test_stream_usage_comes_from_the_final_chunk(compat, upstream):
    request = pb.StreamGenerateRequest(model="instant", messages=[user("hi")],
                                       sampling=pb.SamplingParams(max_tokens=20))
    upstream.bodies.clear()
    events, final = await collect(compat.StreamGenerate(request))
    sent = upstream.bodies[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 20 and sent["model"] == "instant"
    # Chunks that arrive in one read leave as one message (see core.coalesce): the text is all there.
    assert "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta") == "tok " * upstream.tokens
    u = final.usage
    assert not u.estimated and (u.prompt_tokens, u.completion_tokens) == (upstream.prompt_tokens, upstream.tokens)
    expected = (upstream.prompt_tokens * PRICE["input_per_mtok"] + upstream.tokens * PRICE["output_per_mtok"]) / 1e6
    assert u.cost.priced and u.cost.cost_usd == pytest.approx(expected)


async def test_list_models_shows_routes_reachability_and_prices(compat):
    r = await compat.ListModels(pb.ListModelsRequest())
    models = {m.name: m for m in r.models}
    assert set(models) == {"smollm2-135m-instruct", "llama-server", "instant"}
    assert all(m.reachable for m in models.values())
    assert models["instant"].pricing.input_per_mtok == 1.0 and not models["llama-server"].HasField("pricing")
    assert models["llama-server"].provider_model == "smollm2-server"
    first = await compat.ListModels(pb.ListModelsRequest(page_size=2))
    second = await compat.ListModels(pb.ListModelsRequest(page_size=2, page_token=first.next_page_token))
    assert [m.name for m in [*first.models, *second.models]] == [m.name for m in r.models]
    assert not second.next_page_token
