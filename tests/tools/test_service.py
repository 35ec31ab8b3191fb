"""The tools service over real gRPC: registry, execution, bad input, limits, plugins, audit, metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import pytest
from google.protobuf import json_format
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from parley.runtime.db import async_url
from parley.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.tools.tools_support import content, execute, free_port, violations

BUILTINS = {"calculator", "current_time", "knowledge_search", "sales_report"}


@pytest.fixture(scope="module")
async def app(start_stack, plugin_dist, loopback):
    metrics_port = free_port()
    tools = {
        "max_concurrency": 2,
        "queue_timeout_s": 0.3,
        "max_argument_bytes": 2048,
        "sales_demo_data": "always",
        "http_apis": [{
            "name": "market_data",
            "description": "Latest stock price of a ticker symbol.",
            "base_url": f"{loopback.url}/quote",
            "headers": {"X-Api-Key": "secret-key"},
            "query_schema": {"type": "object", "properties": {"symbol": {"type": "string", "pattern": "^[A-Z]{1,5}$"}},
                             "required": ["symbol"], "additionalProperties": False},
        }],
        "http_allowed_networks": ["127.0.0.1/32"],
    }
    async with start_stack(["tools"], tools=tools, metrics_port=metrics_port) as running:
        running.metrics_port = metrics_port
        yield running


@pytest.fixture(scope="module")
async def stub(app):
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield tools_pb2_grpc.ToolsServiceStub(channel)


async def test_list_tools_shows_builtins_plugins_and_http_apis(stub):
    tools = {t.name: t for t in (await stub.ListTools(tools_pb2.ListToolsRequest())).tools}
    assert BUILTINS | {"market_data", "shout", "sleepy", "crash", "not_json"} <= set(tools)
    assert "bad_schema" not in tools  # invalid JSON schema: skipped, service up
    assert tools["calculator"].source == "builtin"  # the plugin's impostor did not replace it
    assert tools["shout"].source == "plugin:testkit"
    sales = tools["sales_report"]
    assert not sales.side_effects and sales.timeout_ms == 10_000
    assert "last month" in sales.description and "by region" in sales.description
    schema = json_format.MessageToDict(sales.parameters_schema)
    assert "last_month" in schema["properties"]["period"]["enum"]
    assert tools["market_data"].source == "builtin" and not tools["market_data"].side_effects


async def test_list_tools_pages_by_name(stub):
    first = await stub.ListTools(tools_pb2.ListToolsRequest(page_size=3))
    assert len(first.tools) == 3 and first.next_page_token
    rest = await stub.ListTools(tools_pb2.ListToolsRequest(page_size=1000, page_token=first.next_page_token))
    names = [t.name for t in first.tools] + [t.name for t in rest.tools]
    assert names == sorted(names) and len(set(names)) == len(names) and not rest.next_page_token


@pytest.mark.parametrize(
    ("request_", "field", "why"),
    [
        (tools_pb2.ListToolsRequest(page_size=-1), "page_size", "must not be negative"),
        (tools_pb2.ListToolsRequest(page_size=5000), "page_size", "must be at most 1000"),
        (tools_pb2.ListToolsRequest(page_token="garbage!"), "page_token", "is not a token this server issued"),
    ],
)
async def test_list_tools_rejects_bad_paging(stub, request_, field, why):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListTools(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {field: why}


async def test_get_tool_and_unknown_tool(stub):
    tool = (await stub.GetTool(tools_pb2.GetToolRequest(name="calculator"))).tool
    assert tool.name == "calculator"
    assert json_format.MessageToDict(tool.parameters_schema)["required"] == ["expression"]
    for call in (stub.GetTool(tools_pb2.GetToolRequest(name="launch_rockets")),
                 execute(stub, "launch_rockets", {})):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "tool 'launch_rockets' not found; ListTools shows the available tools"


async def test_execute_builtins(stub):
    result = await execute(stub, "calculator", {"expression": "(1250 * 0.15) + 2^10"}, call_id="c-42")
    assert result.call_id == "c-42" and result.name == "calculator" and result.duration_ms >= 0
    assert content(result) == {"expression": "(1250 * 0.15) + 2^10", "result": 1211.5}
    now = content(await execute(stub, "current_time", {"timezone": "Asia/Kolkata"}))
    assert now["utc_offset"] == "+05:30" and now["timezone"] == "Asia/Kolkata"
    bad = await execute(stub, "calculator", {"expression": "__import__('os').system('id')"})
    assert bad.outcome == tools_pb2.OUTCOME_ERROR and bad.error.startswith("only these functions can be called")


async def test_sales_question_through_grpc(stub):
    """'How many deals did we close last month, by region?' (the demo data was seeded at start)."""
    report = content(await execute(stub, "sales_report", {"period": "last_month", "group_by": "region",
                                                          "metric": "deals_closed"}))
    regions = {row["region"]: row["deals_closed"] for row in report["rows"]}
    assert set(regions) == {"North America", "EMEA", "APAC", "LATAM"}
    assert all(n > 0 for n in regions.values()) and sum(regions.values()) == report["totals"]["deals_closed"]
    assert "amount" not in report["totals"]


async def test_schema_violations_are_listed(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "sales_report", {"period": "someday", "group_by": "planet", "limit": 3})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert set(found) == {"arguments.period", "arguments.group_by", "arguments"}
    assert "'someday' is not one of" in found["arguments.period"]
    assert "'limit' was unexpected" in found["arguments"]
    assert err.value.details().startswith("arguments do not match the schema of tool 'sales_report': ")

    with pytest.raises(grpc.aio.AioRpcError) as err:  # custom period without its dates; date format checked
        await execute(stub, "sales_report", {"period": "custom", "start_date": "2026-13-45"})
    found = violations(err.value)
    assert "'end_date' is a required property" in found["arguments"]
    assert "is not a 'date'" in found["arguments.start_date"]

    with pytest.raises(grpc.aio.AioRpcError) as err:  # wrong type; missing required
        await execute(stub, "calculator", {"expression": 42})
    assert violations(err.value) == {"arguments.expression": "42 is not of type 'string'"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "calculator")
    assert violations(err.value) == {"arguments": "'expression' is a required property"}


async def test_oversized_arguments_and_bad_ids(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "shout", {"text": "a" * 5000})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {"arguments": "are 5011 bytes as JSON; the limit is 2048"}
    for user, why in (("", "is required"), ("bad user!", "must be 1-128 characters")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await execute(stub, "calculator", {"expression": "1"}, user_id=user)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value)["user_id"].startswith(why)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "calculator", {"expression": "1"}, call_id="x" * 200)
    assert set(violations(err.value)) == {"call_id"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "no such tool!", {})
    assert violations(err.value) == {"name": "must be 1-64 characters of letters, digits, '_' and '-'"}


async def test_plugin_tools_run_and_fail_as_results(stub):
    assert content(await execute(stub, "shout", {"text": "hi"}, user_id="bob")) == {"text": "HI", "user": "bob"}
    crashed = await execute(stub, "crash", {})
    assert crashed.outcome == tools_pb2.OUTCOME_ERROR and "internal error" in crashed.error
    assert "secret" not in crashed.error  # the exception text stays in the server log
    not_json = await execute(stub, "not_json", {})
    assert not_json.outcome == tools_pb2.OUTCOME_ERROR and "cannot be encoded as JSON" in not_json.error


async def test_hanging_tool_times_out_and_the_service_stays_up(stub):
    result = await execute(stub, "sleepy", {})
    assert result.outcome == tools_pb2.OUTCOME_TIMEOUT
    assert result.error == "the tool did not finish within its time limit of 0.5 s"
    assert 450 <= result.duration_ms < 3000
    assert content(await execute(stub, "calculator", {"expression": "1+1"}))["result"] == 2


async def test_concurrency_is_bounded(stub):
    """max_concurrency=2, queue_timeout_s=0.3: a third call while two hang is RESOURCE_EXHAUSTED."""
    hanging = [asyncio.create_task(execute(stub, "sleepy", {})) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "calculator", {"expression": "1"})
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tool slots are busy" in err.value.details()
    assert [r.outcome for r in await asyncio.gather(*hanging)] == [tools_pb2.OUTCOME_TIMEOUT] * 2
    assert content(await execute(stub, "calculator", {"expression": "2*3"}))["result"] == 6


async def test_http_api_tool_on_an_allowlisted_loopback(stub):
    result = content(await execute(stub, "market_data", {"query": {"symbol": "ACME"}}))
    assert result["status"] == 200 and result["content_type"] == "application/json"
    assert result["body"]["symbol"] == "ACME" and result["body"]["api_key_seen"] == "secret-key"
    assert "secret-key" not in json.dumps(result["url"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "market_data", {"query": {"symbol": "acme; DROP"}})
    assert set(violations(err.value)) == {"arguments.query.symbol"}


async def test_every_execution_is_audited(app, stub):
    await execute(stub, "calculator", {"expression": "7*6"}, user_id="auditee", call_id="a1")
    await execute(stub, "sleepy", {}, user_id="auditee", call_id="a2")
    with pytest.raises(grpc.aio.AioRpcError):
        await execute(stub, "calculator", {"expression": 1}, user_id="auditee", call_id="a3")
    engine = create_async_engine(async_url(app.database_url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT call_id, tool, outcome, arguments, duration_ms, error FROM tools_audit "
                "WHERE user_id = 'auditee' ORDER BY id"
            ))).all()
    finally:
        await engine.dispose()
    assert [(r.call_id, r.tool, r.outcome) for r in rows] == [
        ("a1", "calculator", "OK"), ("a2", "sleepy", "TIMEOUT"), ("a3", "calculator", "REJECTED")
    ]
    assert rows[0].arguments == {"expression": "7*6"} and rows[1].duration_ms >= 450
    assert "not of type 'string'" in rows[2].error


async def test_executions_are_counted_in_metrics(app, stub):
    await execute(stub, "calculator", {"expression": "1"})
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5).read().decode()
    )
    assert 'parley_tool_executions_total{outcome="OK",tool="calculator"}' in body
    assert 'parley_tool_executions_total{outcome="TIMEOUT",tool="sleepy"}' in body
    assert 'parley_tool_execution_duration_seconds_bucket{le="0.5",outcome="OK",tool="calculator"}' in body
