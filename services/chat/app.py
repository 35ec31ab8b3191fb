"""Builds the chat service over clients of the memory and inference services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from parley.inference.v1 import inference_pb2_grpc
from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.app import ServiceContext
from parley.runtime.server import ServiceBinding
from services.chat.core import ChatCore
from services.chat.peers import InferencePeer, MemoryPeer
from services.chat.servicer import ChatServicer

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


@asynccontextmanager
async def build(ctx: ServiceContext) -> AsyncIterator[ServiceBinding]:
    memory = MemoryPeer(ctx.client("memory", memory_pb2_grpc.MemoryServiceStub))
    inference = InferencePeer(
        ctx.client("inference", inference_pb2_grpc.InferenceServiceStub, ctx.settings.generate_timeout_s)
    )
    servicer = ChatServicer(ChatCore(ctx.settings.chat, memory, inference))
    yield ServiceBinding(
        name="chat",
        full_names=(SERVICE_NAME,),
        register=lambda server: chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server),
    )
