"""The built-in tools: sales_report, knowledge_search, calculator, current_time and the configured HTTP APIs."""

from __future__ import annotations

from parley.memory.v1.memory_pb2_grpc import MemoryServiceStub
from parley.runtime.logging import get_logger
from services.tools.builtin.calculator import Calculator
from services.tools.builtin.clock import CurrentTime
from services.tools.builtin.http_api import HttpApiTool
from services.tools.builtin.knowledge import KnowledgeSearch
from services.tools.builtin.sales_report import SalesReport
from services.tools.core import Tool
from services.tools.host import ToolHost

_log = get_logger(__name__)


def builtin_tools(host: ToolHost) -> list[Tool]:
    s = host.settings
    tools: list[Tool] = [
        Calculator(),
        CurrentTime(),
        SalesReport(host.database.engine, s.sales_timezone, s.sales_currency),
        KnowledgeSearch(host.client("memory", MemoryServiceStub)),
    ]
    for api in s.http_apis:
        try:
            tools.append(HttpApiTool(api, host.http, s.http_timeout_s))
        except ValueError as exc:
            _log.error("tool_skipped", tool=api.name, why=str(exc))
    return tools
