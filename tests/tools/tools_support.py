"""Helpers of the tools tests: gRPC calls and error details."""

from __future__ import annotations

import json
import socket

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from parley.tools.v1 import tools_pb2, tools_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def struct(value: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def execute(stub: tools_pb2_grpc.ToolsServiceStub, name: str, arguments: dict | None = None,
                  user_id: str = "alice", call_id: str = "call-1") -> tools_pb2.ToolResult:
    request = tools_pb2.ExecuteToolRequest(name=name, user_id=user_id, call_id=call_id)
    if arguments is not None:
        request.arguments.CopyFrom(struct(arguments))
    return (await stub.ExecuteTool(request)).result


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an error status."""
    status = rpc_status.from_call(err)
    found: dict[str, str] = {}
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def content(result: tools_pb2.ToolResult):
    assert result.outcome == tools_pb2.OUTCOME_OK, (result.outcome, result.error)
    return json.loads(result.content_json)
