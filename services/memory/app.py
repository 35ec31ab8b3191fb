"""Builds the memory service: embedder and store once, the servicer over them, teardown after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from parley.memory.v1 import memory_pb2, memory_pb2_grpc
from parley.runtime.app import ServiceContext
from parley.runtime.server import ServiceBinding
from services.memory.core import EmbeddingBackfill, MemoryCore
from services.memory.servicer import MemoryServicer
from services.memory.store import MemoryStore

SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name


@asynccontextmanager
async def build(ctx: ServiceContext) -> AsyncIterator[ServiceBinding]:
    embedder = await ctx.embedder()
    store = MemoryStore(ctx.database.engine, ctx.settings.memory.exact_recall_max_messages,
                        ctx.database.derived_engine)
    backfill = EmbeddingBackfill(store, embedder)
    backfill.start()
    core = MemoryCore(store, embedder, ctx.settings.memory)
    servicer = MemoryServicer(core)
    try:
        yield ServiceBinding(
            name="memory",
            full_names=(SERVICE_NAME,),
            register=lambda server: memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, server),
        )
    finally:
        await core.close()
        await backfill.close()
