"""Tools from MCP servers (stdio and streamable HTTP), through the official `mcp` SDK.

Each configured server gets one long-lived connection owned by its own supervisor
task (the SDK's client holds anyio task groups, which must be entered and left by
the same task). The supervisor connects, lists the server's tools into the registry
as `<server>__<tool>` (source `mcp:<server>`), re-lists them every
`mcp_ping_interval_s` (which is also the liveness check), and reconnects with
backoff when the server goes away. A server that is down at start-up does not stop
the service: its tools appear once it answers.

A tool has side effects (needs approval) unless the server marks it read-only
(`readOnlyHint`) or the configuration says otherwise. Arguments are checked against
the tool's own input schema before the call, like every other tool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from contextlib import AsyncExitStack
from typing import Any

import httpx2
import mcp_types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import REQUEST_TIMEOUT

from parley.runtime.config import ToolsSettings
from parley.runtime.logging import get_logger
from services.tools.core import CallContext, Tool, ToolError, ToolSpec
from services.tools.registry import Registry

_log = get_logger(__name__)
MAX_PAGES = 50
MAX_BACKOFF_S = 60.0
READ_TIMEOUT_MARGIN_S = 5.0


def tool_name(server: str, remote: str) -> str:
    """`<server>__<tool>` in the registry's alphabet, at most 64 characters (hash-suffixed if cut)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}__{remote}")
    if len(name) <= 64:
        return name
    return name[:55] + "_" + hashlib.sha256(remote.encode()).hexdigest()[:8]


def result_value(result: mcp_types.CallToolResult) -> Any:
    """What the model reads: structured content if any, else the text blocks joined."""
    parts = [block.text if block.type == "text" else f"[{block.type} content omitted]" for block in result.content]
    text = "\n".join(parts)
    if result.is_error:
        raise ToolError(text or "the MCP tool reported an error")
    if result.structured_content is not None:
        return result.structured_content
    return text


class McpTool(Tool):
    def __init__(self, connection: McpConnection, remote: mcp_types.Tool) -> None:
        cfg = connection.cfg
        read_only = bool(remote.annotations and remote.annotations.read_only_hint)
        self.remote_name = remote.name
        self._connection = connection
        self.spec = ToolSpec(
            name=tool_name(cfg.name, remote.name),
            description=(remote.description or (remote.annotations and remote.annotations.title) or remote.name)[
                :4000
            ],
            parameters=remote.input_schema,
            timeout_s=cfg.timeout_s,
            side_effects=cfg.side_effects if cfg.side_effects is not None else not read_only,
            source=connection.source,
        )

    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        return await self._connection.call(self.remote_name, args, self.spec.timeout_s)


class McpConnection:
    """One MCP server: its supervisor task, its current client (None while disconnected)."""

    def __init__(self, cfg: ToolsSettings.McpServer, registry: Registry, refresh_s: float, connect_s: float) -> None:
        self.cfg = cfg
        self.source = f"mcp:{cfg.name}"
        self._registry = registry
        self._refresh_s = refresh_s
        self._connect_s = connect_s
        self._client: Client | None = None
        self._stop = asyncio.Event()
        self._reconnect = asyncio.Event()
        self._attempted = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._listed: list[tuple[str, str, str, bool]] | None = None  # last listing of this connection

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        """Start the supervisor; wait (at most the connect timeout) for the first attempt."""
        self._task = asyncio.create_task(self._supervise(), name=f"mcp-{self.cfg.name}")
        try:
            await asyncio.wait_for(self._attempted.wait(), self._connect_s + 1)
        except TimeoutError:
            _log.warning("mcp_server_slow", server=self.cfg.name)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def call(self, name: str, args: dict[str, Any], timeout_s: float) -> Any:
        client = self._client
        if client is None:
            raise ToolError(f"MCP server {self.cfg.name!r} is not connected right now; try again later")
        try:
            # The executor enforces `timeout_s`; the SDK's own limit is a backstop that must not fire first.
            result = await client.call_tool(name, args, read_timeout_seconds=timeout_s + READ_TIMEOUT_MARGIN_S)
        except TimeoutError:
            raise
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise TimeoutError from None
            raise ToolError(f"MCP server {self.cfg.name!r}: {exc}") from None
        except Exception as exc:  # transport gone, malformed answer, ...: reconnect and tell the model
            _log.warning("mcp_call_failed", server=self.cfg.name, tool=name, error=repr(exc)[:300])
            self._reconnect.set()
            raise ToolError(f"MCP server {self.cfg.name!r} failed: {type(exc).__name__}") from None
        return result_value(result)

    def _transport(self, http_client: httpx2.AsyncClient | None):
        cfg = self.cfg
        if cfg.transport == "stdio":
            assert cfg.command is not None
            return stdio_client(StdioServerParameters(command=cfg.command, args=cfg.args, env=cfg.env or None,
                                                      cwd=cfg.cwd))
        assert cfg.url is not None and http_client is not None
        return streamable_http_client(cfg.url, http_client=http_client)

    async def _supervise(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._listed = None
            try:
                await self._session()
            except Exception as exc:
                _log.warning("mcp_server_unavailable", server=self.cfg.name, error=_describe(exc), retry_s=delay)
            finally:
                self._client = None
                self._attempted.set()
            if self._stop.is_set():
                break
            if self._listed is not None:  # it was up: start the backoff over
                delay = 1.0
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def _session(self) -> None:
        """Connect, list tools, then refresh until stopped, asked to reconnect, or the server fails."""
        async with AsyncExitStack() as stack:
            http_client = None
            if self.cfg.transport == "streamable_http":
                http_client = await stack.enter_async_context(
                    httpx2.AsyncClient(headers=self.cfg.headers, timeout=httpx2.Timeout(30.0, read=300.0))
                )
            client = Client(self._transport(http_client), read_timeout_seconds=self._connect_s)
            async with asyncio.timeout(self._connect_s):
                await stack.enter_async_context(client)
                await self._refresh(client)
            self._client = client
            self._reconnect.clear()
            self._attempted.set()
            while True:
                await _first_of(self._stop, self._reconnect, timeout=self._refresh_s)
                if self._stop.is_set() or self._reconnect.is_set():
                    return
                async with asyncio.timeout(self._connect_s):
                    await self._refresh(client, quiet=True)

    async def _refresh(self, client: Client, quiet: bool = False) -> None:
        """List the server's tools; re-register them when the listing changed (or always, unless quiet)."""
        remote: list[mcp_types.Tool] = []
        cursor = None
        for _ in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor, cache_mode="refresh")
            remote.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        tools = [McpTool(self, t) for t in remote]
        listed = _signature(t.spec for t in tools)
        if quiet and listed == self._listed:
            return
        self._listed = listed
        names = self._registry.replace_source(self.source, tools)
        _log.info("mcp_server_tools", server=self.cfg.name, tools=names)


def _signature(specs) -> list[tuple[str, str, str, bool]]:
    return sorted((s.name, s.description, json.dumps(s.parameters, sort_keys=True), s.side_effects) for s in specs)


async def _first_of(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"[:300]


class McpManager:
    """Starts a connection per configured server on enter, stops them all on exit."""

    def __init__(self, settings: ToolsSettings, registry: Registry) -> None:
        self.connections = [
            McpConnection(cfg, registry, settings.mcp_ping_interval_s, settings.mcp_connect_timeout_s)
            for cfg in settings.mcp_servers
        ]

    async def __aenter__(self) -> McpManager:
        await asyncio.gather(*(c.start() for c in self.connections))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.stop() for c in self.connections))
