"""Pure parts of the tools service: calculator, registry, configuration, plugin loading, argument handling."""

from __future__ import annotations

import re
from importlib.metadata import EntryPoint

import pytest
from pydantic import ValidationError

from parley.runtime.config import Settings
from services.tools.audit import capped_arguments
from services.tools.builtin.calculator import Calculator, evaluate
from services.tools.builtin.clock import CurrentTime
from services.tools.builtin.http_api import PATH_PATTERN
from services.tools.core import CallContext, FunctionTool, Tool, ToolError, ToolSpec, tool
from services.tools.executor import normalize_numbers
from services.tools.plugins import load_plugins
from services.tools.registry import Registry

OBJECT = {"type": "object", "properties": {}, "additionalProperties": False}


@pytest.mark.parametrize(
    ("expression", "value"),
    [("1 + 2 * 3", 7), ("2^10", 1024), ("2 ^ 3 ^ 2", 512), ("(1250 * 0.15) + 2^10", 1211.5), ("0.1 + 0.2", 0.3),
     ("10 / 4", 2.5), ("7 // 2", 3), ("-3 % 5", 2), ("sqrt(16) + abs(-2)", 6), ("round(pi, 3)", 3.142),
     ("max(1, 5, 3) - min(4, 2)", 3), ("log(1000, 10)", 3), ("1200 × 3", 3600)],
)
def test_calculator_values(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [("1/0", "division by zero"), ("9**9**9", "too large"), ("2**100000", "too large"), ("10**400.0", "math error"),
     ("(-8) ** 0.5", "complex"), ("1,000", "thousands separators"), ("__import__('os')", "unknown function"),
     ("().__class__", "not allowed"), ("x + 1", "unknown name 'x'"), ("'a' * 3", "not allowed"),
     ("2 +", "not a valid expression"), ("+".join(["1"] * 150), "too long"), ("sqrt(-1)", "math error")],
)
def test_calculator_refuses(expression, message):
    with pytest.raises(ToolError, match=re.escape(message)):
        evaluate(expression)


def _noop(name: str, schema=None, **kw) -> Tool:
    return FunctionTool(ToolSpec(name, "test tool", schema if schema is not None else OBJECT, **kw), lambda: None)


def test_registry_enables_by_configuration_and_checks_tools():
    registry = Registry(["calc*", "current_time", "mcp_*"], disabled=["mcp_secret*"], timeouts={"calculator": 2})
    assert registry.add(Calculator()) and registry.add(CurrentTime())
    assert registry.get("calculator").spec.timeout_s == 2  # per-deployment override
    assert not registry.add(_noop("sales_report"))  # not enabled
    assert not registry.add(_noop("mcp_secret_tool")) and registry.add(_noop("mcp_public"))
    assert not registry.add(_noop("calculator_2", {"type": "array"}))  # arguments must be an object
    assert not registry.add(_noop("calc_bad", {"type": "object", "properties": {"x": {"type": 5}}}))
    assert not registry.add(_noop("calc bad name"))
    assert not registry.add(_noop("calculator"))  # taken
    assert registry.names() == ["calculator", "current_time", "mcp_public"]
    page, more = registry.page(None, 2)
    assert [e.spec.name for e in page] == ["calculator", "current_time"] and more
    page, more = registry.page("current_time", 2)
    assert [e.spec.name for e in page] == ["mcp_public"] and not more
    assert registry.replace_source("mcp:x", [_noop("mcp_a"), _noop("mcp_b")]) == ["mcp_a", "mcp_b"]
    assert registry.replace_source("mcp:x", [_noop("mcp_b")]) == ["mcp_b"]
    assert registry.names() == ["calculator", "current_time", "mcp_b", "mcp_public"]


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("PARLEY_TOOLS__ENABLED", '["calculator", "market_data"]')
    monkeypatch.setenv(
        "PARLEY_TOOLS__HTTP_APIS",
        '[{"name": "market_data", "description": "FX rates", "base_url": "https://api.frankfurter.app/latest",'
        ' "headers": {"Authorization": "Bearer x"}}]',
    )
    monkeypatch.setenv(
        "PARLEY_TOOLS__MCP_SERVERS",
        '[{"name": "files", "transport": "stdio", "command": "npx", "args": ["-y", "server"]},'
        ' {"name": "search", "transport": "streamable_http", "url": "http://127.0.0.1:8000/mcp"}]',
    )
    tools = Settings(_env_file=None).tools
    assert tools.enabled == ["calculator", "market_data"]
    assert tools.http_apis[0].method == "GET" and tools.http_apis[0].headers == {"Authorization": "Bearer x"}
    assert [s.transport for s in tools.mcp_servers] == ["stdio", "streamable_http"]
    monkeypatch.setenv("PARLEY_TOOLS__MCP_SERVERS", '[{"name": "x", "transport": "streamable_http"}]')
    with pytest.raises(ValidationError, match="needs an http\\(s\\) 'url'"):
        Settings(_env_file=None)


class _Hello(Tool):
    spec = ToolSpec("hello", "Says hello.", OBJECT)

    async def run(self, args, call):
        return "hello"


HELLO = _Hello()


def make_two(host):
    return [tool("one", "One.", OBJECT)(lambda: 1), tool("two", "Two.", OBJECT)(lambda: 2)]


def make_garbage(host):
    return ["not a tool"]


def test_plugin_loader_takes_tools_classes_and_factories():
    eps = [EntryPoint(name, f"{__name__}:{attr}", "parley.tools") for name, attr in
           [("inst", "HELLO"), ("cls", "_Hello"), ("factory", "make_two"), ("garbage", "make_garbage"),
            ("missing", "nope"), ("skipped", "HELLO")]]
    loaded = load_plugins(eps, host=object(), allowed=["inst", "cls", "factory", "garbage", "missing"])
    assert [(source, t.spec.name) for source, t in loaded] == [
        ("plugin:inst", "hello"), ("plugin:cls", "hello"), ("plugin:factory", "one"), ("plugin:factory", "two")
    ]


async def test_function_tools_get_keywords_and_the_call():
    @tool("greet", "Greets.", OBJECT)
    async def greet(name: str, call: CallContext):
        return f"hi {name} from {call.user_id}"

    assert await greet.run({"name": "Ann"}, CallContext("u7")) == "hi Ann from u7"


def test_struct_numbers_regain_their_int_type():
    assert normalize_numbers({"a": 2.0, "b": [1.5, 3.0], "c": {"d": -0.0}, "e": "1.0"}) == {
        "a": 2, "b": [1.5, 3], "c": {"d": 0}, "e": "1.0"
    }


def test_audit_arguments_are_capped():
    raw, truncated = capped_arguments({"q": "x" * 10}, 100)
    assert raw == '{"q":"xxxxxxxxxx"}' and not truncated
    raw, truncated = capped_arguments({"q": "x" * 1000, "nul": "a\x00b"}, 100)
    assert truncated and '"_truncated": true' in raw and "\\u0000" not in raw


@pytest.mark.parametrize("path", ["quotes/AAPL", "v1/fx/EUR-USD", "a.b/c_d~e"])
def test_http_path_pattern_accepts_relative_paths(path):
    assert re.search(PATH_PATTERN, path)


@pytest.mark.parametrize("path", ["../admin", "a/../b", "a/./b", "..", "/etc/passwd", "a//b", "%2e%2e/x",
                                  "http://evil", "a?b=c", "a#b", ""])
def test_http_path_pattern_refuses_escapes(path):
    assert not re.search(PATH_PATTERN, path)
