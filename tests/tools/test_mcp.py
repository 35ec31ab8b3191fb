"""MCP: tools of real MCP servers (official SDK; stdio subprocess and streamable HTTP) listed and run
through the tools service, with schema checks, errors, timeouts, a dead server and a reconnect."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from pathlib import Path

import grpc
import pytest
import uvicorn

from parley.tools.v1 import tools_pb2, tools_pb2_grpc
from services.tools.mcp_servers import tool_name
from tests.tools import tools_mcp_server
from tests.tools.tools_support import content, execute, violations

SERVER_SCRIPT = Path(__file__).resolve().parent / "tools_mcp_server.py"


class HttpMcpServer:
    """The test MCP server over streamable HTTP on a fixed loopback port, restartable."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        config = uvicorn.Config(tools_mcp_server.app.streamable_http_app(), log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture(scope="module")
def http_mcp():
    server = HttpMcpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def stub(start_stack, http_mcp):
    tools = {
        "mcp_servers": [
            {"name": "local", "transport": "stdio", "command": sys.executable, "args": [str(SERVER_SCRIPT)],
             "timeout_s": 2.0},
            {"name": "remote", "transport": "streamable_http", "url": http_mcp.url},
            {"name": "broken", "transport": "stdio", "command": "/nonexistent/mcp-server"},
        ],
        "mcp_connect_timeout_s": 15,
        "mcp_ping_interval_s": 0.5,
    }
    async with start_stack(["tools"], tools=tools) as app:
        async with grpc.aio.insecure_channel(app.address) as channel:
            yield tools_pb2_grpc.ToolsServiceStub(channel)


async def test_mcp_tools_are_listed_with_their_schemas(stub):
    tools = {t.name: t for t in (await stub.ListTools(tools_pb2.ListToolsRequest())).tools}
    for server in ("local", "remote"):
        assert {f"{server}__add", f"{server}__remember", f"{server}__explode", f"{server}__wait"} <= set(tools)
        add = tools[f"{server}__add"]
        assert add.source == f"mcp:{server}" and add.description == "Adds two integers."
        assert not add.side_effects  # the server marks it read-only
        assert tools[f"{server}__remember"].side_effects  # not marked read-only: needs approval
    assert tools["local__add"].timeout_ms == 2000
    assert not [name for name in tools if name.startswith("broken__")]  # a dead server: no tools, service up


async def test_mcp_tools_run_over_stdio_and_streamable_http(stub):
    assert content(await execute(stub, "local__add", {"a": 2, "b": 40})) == {"result": 42}
    assert content(await execute(stub, "remote__add", {"a": -1, "b": 1})) == {"result": 0}
    assert content(await execute(stub, "remote__remember", {"note": "milk"})) == {"result": "stored: milk"}


async def test_mcp_arguments_are_checked_before_the_call(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(stub, "local__add", {"a": "two"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {
        "arguments": "'b' is a required property",
        "arguments.a": "'two' is not of type 'integer'",
    }


async def test_mcp_tool_errors_and_timeouts_are_results(stub):
    failed = await execute(stub, "local__explode", {"reason": "boom"})
    assert failed.outcome == tools_pb2.OUTCOME_ERROR and "explode" in failed.error
    slow = await execute(stub, "local__wait", {"seconds": 30})
    assert slow.outcome == tools_pb2.OUTCOME_TIMEOUT
    assert content(await execute(stub, "local__add", {"a": 1, "b": 1})) == {"result": 2}  # still connected


async def test_mcp_server_restart_is_reconnected(stub, http_mcp):
    http_mcp.stop()
    down = await execute(stub, "remote__add", {"a": 1, "b": 2})
    assert down.outcome == tools_pb2.OUTCOME_ERROR and "MCP server 'remote'" in down.error
    http_mcp.start()
    for _ in range(100):  # the supervisor reconnects with backoff (1 s, 2 s, ...)
        result = await execute(stub, "remote__add", {"a": 1, "b": 2})
        if result.outcome == tools_pb2.OUTCOME_OK:
            break
        await asyncio.sleep(0.2)
    assert content(result) == {"result": 3}


def test_tool_names_fit_the_registry():
    assert tool_name("files", "read.file") == "files__read_file"
    long = tool_name("server", "x" * 100)
    assert len(long) == 64 and long.startswith("server__xxx") and long != tool_name("server", "x" * 99)
