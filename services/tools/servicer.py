"""gRPC servicer of parley.tools.v1.ToolsService: protobuf in and out, no logic."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from parley.runtime.validation import decode_page_token, encode_page_token, page_size
from parley.tools.v1 import tools_pb2, tools_pb2_grpc
from services.tools.executor import Executor, ToolOutcome
from services.tools.registry import Entry

DEFAULT_PAGE_SIZE = 100
_OUTCOMES = {
    "OK": tools_pb2.OUTCOME_OK,
    "ERROR": tools_pb2.OUTCOME_ERROR,
    "TIMEOUT": tools_pb2.OUTCOME_TIMEOUT,
}


def _tool(entry: Entry) -> tools_pb2.Tool:
    spec = entry.spec
    schema = struct_pb2.Struct()
    json_format.ParseDict(dict(spec.parameters), schema)
    return tools_pb2.Tool(
        name=spec.name,
        description=spec.description,
        parameters_schema=schema,
        timeout_ms=int(spec.timeout_s * 1000),
        side_effects=spec.side_effects,
        source=spec.source,
    )


def _result(outcome: ToolOutcome) -> tools_pb2.ToolResult:
    return tools_pb2.ToolResult(
        call_id=outcome.call_id,
        name=outcome.name,
        outcome=_OUTCOMES[outcome.outcome],
        content_json=outcome.content_json,
        error=outcome.error,
        duration_ms=outcome.duration_ms,
    )


class ToolsServicer(tools_pb2_grpc.ToolsServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def ListTools(self, request: tools_pb2.ListToolsRequest, context) -> tools_pb2.ListToolsResponse:
        size = page_size(request.page_size, default=DEFAULT_PAGE_SIZE)
        position = decode_page_token(request.page_token, scope={"method": "ListTools"})
        after = str(position[0]) if position else None
        entries, more = self._executor.registry.page(after, size)
        token = encode_page_token([entries[-1].spec.name], scope={"method": "ListTools"}) if more and entries else ""
        return tools_pb2.ListToolsResponse(tools=[_tool(e) for e in entries], next_page_token=token)

    async def GetTool(self, request: tools_pb2.GetToolRequest, context) -> tools_pb2.GetToolResponse:
        return tools_pb2.GetToolResponse(tool=_tool(self._executor.lookup(request.name)))

    async def ExecuteTool(self, request: tools_pb2.ExecuteToolRequest, context) -> tools_pb2.ExecuteToolResponse:
        arguments = json_format.MessageToDict(request.arguments) if request.HasField("arguments") else {}
        outcome = await self._executor.execute(request.name, request.user_id, arguments, request.call_id)
        return tools_pb2.ExecuteToolResponse(result=_result(outcome))
