"""Builds the chat service over its guards and clients of the memory, inference and tools services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from parley.inference.v1 import inference_pb2_grpc
from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.app import ServiceContext
from parley.runtime.server import ServiceBinding
from parley.tools.v1 import tools_pb2_grpc
from services.chat.agent import Agent, ModelCatalog
from services.chat.approvals import ApprovalStore
from services.chat.core import ChatCore
from services.chat.guards import check_bind_safety, open_guards
from services.chat.peers import InferencePeer, MemoryPeer, ToolsPeer
from services.chat.router import ToolRouter
from services.chat.servicer import ChatServicer
from services.chat.summary import Summarizer
from services.chat.telemetry import TurnMetrics

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


@asynccontextmanager
async def build(ctx: ServiceContext) -> AsyncIterator[ServiceBinding]:
    check_bind_safety(ctx.settings)  # before the server starts listening
    cfg = ctx.settings.chat
    memory = MemoryPeer(ctx.client("memory", memory_pb2_grpc.MemoryServiceStub))
    inference = InferencePeer(
        ctx.client("inference", inference_pb2_grpc.InferenceServiceStub, ctx.settings.generate_timeout_s)
    )
    tools = ToolsPeer(ctx.client("tools", tools_pb2_grpc.ToolsServiceStub))
    router = ToolRouter(await ctx.embedder(), cfg.router_threshold, cfg.router_margin)
    agent = Agent(cfg, inference, tools, router, ModelCatalog(inference))
    async with open_guards(ctx) as guards:
        core = ChatCore(
            cfg, ctx.settings.inference.default_max_tokens, memory, agent,
            ApprovalStore(ctx.database.engine, cfg.approval_ttl_s), guards, Summarizer(cfg, memory, inference),
            TurnMetrics(ctx.metrics),
        )
        servicer = ChatServicer(core)
        yield ServiceBinding(
            name="chat",
            full_names=(SERVICE_NAME,),
            register=lambda server: chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server),
            internal=False,
        )
