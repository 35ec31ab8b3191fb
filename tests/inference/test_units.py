"""Pure pieces: prices and cost, route configuration, cooldowns, retry waits, stop sequences."""

from __future__ import annotations

import json

import pytest
from tenacity import RetryCallState

from parley.runtime.config import InferenceSettings, Settings
from services.inference.domain import ProviderUsage
from services.inference.pricing import PriceError, PriceTable, compute_cost
from services.inference.providers.base import RATE_LIMIT, SERVER, ProviderError
from services.inference.providers.llama_engine import _StopScanner, grammar_for, json_gbnf
from services.inference.providers.toolcalls import parse_call
from services.inference.resilience import Cooldowns, _Backoff
from services.inference.routes import RouteError, load_routes


def table(**overrides) -> PriceTable:
    return PriceTable.load(None, overrides)


def test_cost_counts_cached_and_written_prompt_tokens_at_their_prices():
    price = table().price("x", "claude-haiku-4-5")
    usage = ProviderUsage(prompt_tokens=1000, completion_tokens=100, cached_prompt_tokens=600, cache_write_tokens=300)
    cost = compute_cost(price, usage)
    assert cost.priced and cost.usd == pytest.approx((100 * 1.0 + 600 * 0.1 + 300 * 1.25 + 100 * 5.0) / 1e6)


def test_long_prompts_use_the_long_context_rates():
    price = table().price("x", "gemini-2.5-pro")
    short = compute_cost(price, ProviderUsage(prompt_tokens=200_000, completion_tokens=1000))
    long = compute_cost(price, ProviderUsage(prompt_tokens=200_001, completion_tokens=1000))
    assert short.usd == pytest.approx((200_000 * 1.25 + 1000 * 10) / 1e6)
    assert long.usd == pytest.approx((200_001 * 2.5 + 1000 * 15) / 1e6)


def test_unknown_models_are_unpriced_never_free():
    assert table().price("mine", "my-finetune") is None
    cost = compute_cost(None, ProviderUsage(prompt_tokens=10, completion_tokens=10))
    assert not cost.priced


def test_dated_model_names_and_overrides():
    prices = table(**{"gpt-4o": {"input_per_mtok": 9, "output_per_mtok": 9}, "my-route": {
        "input_per_mtok": 0, "output_per_mtok": 0}})
    assert prices.price("r", "gpt-4o-mini-2024-07-18").input_per_mtok == 0.15  # date suffix stripped, not prefix
    assert prices.price("r", "gpt-4o-2024-08-06").input_per_mtok == 9  # override by provider model
    free = prices.price("my-route", "llama-3")
    assert free is not None and compute_cost(free, ProviderUsage(5, 5)).usd == 0  # priced at 0 on purpose
    assert prices.price("r", "models/gemini-2.5-flash").output_per_mtok == 2.5
    assert prices.context_window("claude-sonnet-4-5-20250929") == 200_000


def test_bad_prices_fail_at_start():
    with pytest.raises(PriceError, match="input_per_mtok is required"):
        table(**{"m": {"output_per_mtok": 1}})
    with pytest.raises(PriceError, match="must be a non-negative number"):
        table(**{"m": {"input_per_mtok": -1, "output_per_mtok": 1}})
    with pytest.raises(PriceError, match="unknown price field"):
        table(**{"m": {"input_per_mtok": 1, "output_per_mtok": 1, "inptu": 2}})


def test_routes_from_the_environment(monkeypatch):
    routes = [{"name": "gpt", "provider": "openai", "model": "gpt-4o-mini", "fallbacks": ["smollm2-135m-instruct"]}]
    monkeypatch.setenv("PARLEY_INFERENCE__ROUTES", json.dumps(routes))
    monkeypatch.setenv("PARLEY_INFERENCE__DEFAULT_MODEL", "gpt")
    loaded = load_routes(Settings(_env_file=None).inference)
    assert list(loaded) == ["smollm2-135m-instruct", "gpt"]
    assert loaded["gpt"].provider_model == "gpt-4o-mini" and loaded["gpt"].fallbacks == ("smollm2-135m-instruct",)


@pytest.mark.parametrize("routes, default, message", [
    ([{"name": "a", "provider": "openai", "fallbacks": ["b"]}], "a", "fallback 'b' is not a route"),
    ([{"name": "a", "provider": "openai"}, {"name": "a", "provider": "gemini"}], "a", "defined twice"),
    ([{"name": "a", "provider": "cohere"}], "a", "PARLEY_INFERENCE__ROUTES[0]: provider"),
    ([{"name": "a", "provider": "vllm"}], "a", "a vllm route needs base_url"),
    ([{"name": "a", "provider": "openai", "api_key": "sk-..."}], "a", "api_key: Extra inputs are not permitted"),
    ([], "gpt-5", "default_model 'gpt-5' is not a route"),
])
def test_route_mistakes_fail_at_start(routes, default, message):
    with pytest.raises(RouteError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_routes(InferenceSettings(routes=routes, default_model=default, local_enabled=False))


def test_cooldown_skips_then_half_opens():
    now = [0.0]
    cooldowns = Cooldowns(failures=2, seconds=10, clock=lambda: now[0])
    assert not cooldowns.failure("e") and not cooldowns.cooling("e")
    assert cooldowns.failure("e") and cooldowns.cooling("e")
    now[0] = 10.5
    assert not cooldowns.cooling("e")  # the next call may try it again
    cooldowns.failure("e")
    cooldowns.success("e")
    assert not cooldowns.failure("e")  # a success resets the count


def test_retry_waits_grow_with_jitter_and_respect_retry_after():
    wait = _Backoff(initial=0.5, maximum=4)

    def state(attempt: int, exc: Exception) -> RetryCallState:
        s = RetryCallState(None, None, (), {})
        s.attempt_number = attempt
        s.set_exception((type(exc), exc, None))
        return s

    first = [wait(state(1, ProviderError(SERVER, "x"))) for _ in range(50)]
    third = [wait(state(3, ProviderError(SERVER, "x"))) for _ in range(50)]
    assert all(0.5 <= w <= 1.0 for w in first) and len(set(first)) > 1  # jittered
    assert all(2.0 <= w <= 2.5 for w in third)
    assert wait(state(1, ProviderError(RATE_LIMIT, "x", 429, retry_after_s=3))) >= 3
    assert wait(state(1, ProviderError(RATE_LIMIT, "x", 429, retry_after_s=60))) == 4  # capped


def test_stop_sequences_across_token_boundaries():
    scanner = _StopScanner(("END",))
    assert scanner.feed("hello E") == ("hello ", False)  # "E" may start "END": held back
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("D and more") == ("", True)
    scanner = _StopScanner(("END",))
    assert scanner.feed("E") == ("", False)
    assert scanner.feed("gg") == ("Egg", False)
    assert scanner.flush() == ""


async def test_coalesce_merges_bursts_keeps_order_and_errors():
    import asyncio

    from services.inference.core import coalesce
    from services.inference.domain import TextDelta

    async def burst():
        for text in ("a", "b", "c"):
            yield TextDelta(text)
        yield "end"

    assert [e if isinstance(e, str) else e.text for e in [x async for x in coalesce(burst())]] == ["abc", "end"]

    async def slow():
        for text in ("a", "b"):
            await asyncio.sleep(0.01)
            yield TextDelta(text)

    assert [e.text async for e in coalesce(slow())] == ["a", "b"]  # token by token when they come apart

    async def failing():
        yield TextDelta("a")
        raise ValueError("boom")

    seen = []
    with pytest.raises(ValueError, match="boom"):
        async for e in coalesce(failing()):
            seen.append(e.text)
    assert seen == ["a"]

    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.001)
                yield TextDelta("x")
        finally:
            closed.set()

    stream = coalesce(endless())
    await anext(stream)
    await stream.aclose()
    assert closed.is_set()  # a caller that goes away stops the source


def test_closed_schemas_accept_only_what_the_original_accepts():
    import jsonschema

    from services.inference.providers.toolcalls import closed

    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "c": {"type": "array", "items": {"type": "object", "properties": {"d": {"type": "integer"}}}},
        "e": {"type": "object", "additionalProperties": {"type": "integer"}},  # a map: left open
    }, "required": ["a"]}
    tight = closed(schema)
    assert tight["additionalProperties"] is False
    assert tight["properties"]["a"]["additionalProperties"] is False
    assert tight["properties"]["c"]["items"]["additionalProperties"] is False
    assert tight["properties"]["e"]["additionalProperties"] == {"type": "integer"}
    ok = {"a": {"b": "x"}, "c": [{"d": 1}], "e": {"k": 1}}
    jsonschema.validate(ok, tight)
    jsonschema.validate(ok, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": {"b": "x", "extra": 1}}, tight)
    assert "additionalProperties" not in schema  # the caller's schema is not modified


def test_tool_call_grammar_keeps_raw_control_characters_out_of_strings():
    """llama-cpp-python's converter allowed any character but `"` and `\\` in a JSON string; the local model once
    wrote a raw newline into a tool argument (`"timezone": "UTC+08:30 }}<newline><newline>The time is in..."`),
    which strict JSON rejects. The grammar now excludes control characters, as llama.cpp's own converter does."""
    gbnf = json_gbnf(json.dumps({"type": "object", "properties": {"t": {"type": "string"}}}))
    [char] = [line for line in gbnf.splitlines() if line.startswith("char ::=")]
    assert char.startswith(r'char ::= [^"\\\x7F\x00-\x1F] |'), char
    assert grammar_for({"type": "string"}, "schema") is not None, "llama.cpp accepts the rewritten grammar"


def test_a_tool_call_with_a_raw_control_character_still_parses():
    raw = '{"name": "get_time", "arguments": {"timezone": "UTC+9\nTokyo"}}'  # a raw newline inside the string
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    call = parse_call(raw)
    assert call.name == "get_time" and json.loads(call.arguments_json) == {"timezone": "UTC+9\nTokyo"}


def test_tool_schemas_convert_as_before_and_each_request_gets_its_own_copy():
    """`request_of` converts a tool's Struct schema through a cache of its JSON: the result equals the
    uncached `MessageToDict` conversion (integers given back), and changing one request's dict leaves the next
    request's alone."""
    from google.protobuf import json_format, struct_pb2

    from parley.inference.v1 import inference_pb2 as pb
    from services.inference.servicer import _integral, request_of

    schema = {"type": "object", "required": ["city"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 40, "default": None},
                             "ratio": {"type": "number", "minimum": 0.5, "multipleOf": 0.25},
                             "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 4},
                             "exact": {"type": "boolean", "const": True}}}
    struct = struct_pb2.Struct()
    json_format.ParseDict(schema, struct)
    request = pb.GenerateRequest(model="m", messages=[pb.Message(role=pb.ROLE_USER, content="hi")],
                                 tools=[pb.ToolDefinition(name="t", description="d", parameters=struct)])
    first = request_of(request).tools[0].parameters
    assert first == _integral(json_format.MessageToDict(struct)) == schema
    assert isinstance(first["properties"]["city"]["maxLength"], int)
    first["properties"].clear()
    assert request_of(request).tools[0].parameters == schema
