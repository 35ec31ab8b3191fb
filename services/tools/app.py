"""The tools service: built once per process from the shared `ServiceContext`.

`build(ctx)` seeds the demo sales data when configured, registers the built-in
tools, the configured HTTP APIs, the `parley.tools` plugins and the tools of the
configured MCP servers (in that order: on a name clash the first one wins), and
yields the gRPC binding. On exit it stops the MCP connections and closes the HTTP
client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx

from parley.runtime.app import ServiceContext
from parley.runtime.logging import get_logger
from parley.runtime.server import ServiceBinding
from parley.tools.v1 import tools_pb2, tools_pb2_grpc
from services.tools import plugins
from services.tools.audit import AuditLog
from services.tools.builtin import builtin_tools
from services.tools.executor import Executor, Limits
from services.tools.host import ToolHost
from services.tools.mcp_servers import McpManager
from services.tools.registry import Registry
from services.tools.safe_http import HttpPolicy, SafeHttp
from services.tools.sales import seed_demo_data
from services.tools.servicer import ToolsServicer

_log = get_logger("parley.tools")
FULL_NAME = tools_pb2.DESCRIPTOR.services_by_name["ToolsService"].full_name


def http_policy(ctx: ServiceContext) -> HttpPolicy:
    s = ctx.settings.tools
    api_hosts = [h for api in s.http_apis if (h := _host_of(api.base_url))]
    return HttpPolicy(
        allowed_hosts=(*s.http_allowed_hosts, *api_hosts),
        allowed_networks=tuple(s.http_allowed_networks),
        timeout_s=s.http_timeout_s,
        max_response_bytes=s.http_max_response_bytes,
        max_redirects=s.http_max_redirects,
        allowed_content_types=tuple(s.http_allowed_content_types),
    )


def _host_of(url: str) -> str | None:
    try:
        return httpx.URL(url).host or None
    except httpx.InvalidURL:
        return None


async def _seed_sales(ctx: ServiceContext) -> None:
    s = ctx.settings.tools
    embedded = ctx.settings.database_url is None
    if s.sales_demo_data == "never" or (s.sales_demo_data == "auto" and not embedded):
        return
    result = await seed_demo_data(ctx.database.engine, timezone=s.sales_timezone)
    _log.info("sales_demo_data", inserted=result.inserted, first=str(result.first_date),
              last=str(result.last_date), skipped=result.skipped or None)


@asynccontextmanager
async def build(ctx: ServiceContext) -> AsyncIterator[ServiceBinding]:
    s = ctx.settings.tools
    async with AsyncExitStack() as stack:
        await _seed_sales(ctx)
        http = SafeHttp(http_policy(ctx))
        stack.push_async_callback(http.aclose)
        host = ToolHost(s, ctx, http)

        registry = Registry(s.enabled, s.disabled, s.timeouts)
        for tool in builtin_tools(host):
            registry.add(tool)
        for source, tool in plugins.load_plugins(plugins.discover(), host, s.plugins):
            registry.add(tool, source=source)
        await stack.enter_async_context(McpManager(s, registry))

        executor = Executor(
            registry,
            AuditLog(ctx.database.engine, s.audit_max_argument_chars),
            ctx.metrics,
            Limits(s.max_concurrency, s.queue_timeout_s, s.max_argument_bytes, s.max_result_bytes),
        )
        servicer = ToolsServicer(executor)
        _log.info("tools_ready", tools=registry.names())
        yield ServiceBinding(
            name="tools",
            full_names=(FULL_NAME,),
            register=lambda server: tools_pb2_grpc.add_ToolsServiceServicer_to_server(servicer, server),
        )
