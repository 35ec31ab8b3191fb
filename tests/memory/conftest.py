import pytest

from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.clients import make_channel


@pytest.fixture(scope="session")
async def memory_app(start_stack):
    async with start_stack(["memory"]) as app:
        yield app


@pytest.fixture(scope="session")
async def memory(memory_app):
    channel = make_channel(memory_app.address)
    yield memory_pb2_grpc.MemoryServiceStub(channel)
    await channel.close()
