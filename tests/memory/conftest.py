import pytest

from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.clients import make_channel
from parley.runtime.db import Database, migrate
from services.memory.store import MemoryStore


@pytest.fixture(scope="session")
async def memory_app(start_stack):
    async with start_stack(["memory"]) as app:
        yield app


@pytest.fixture(scope="session")
async def memory(memory_app):
    channel = make_channel(memory_app.address)
    yield memory_pb2_grpc.MemoryServiceStub(channel)
    await channel.close()


@pytest.fixture(scope="module")
async def store(database_url):
    """The memory store on the test database, migrated (module scope: one engine per test module)."""
    await migrate(database_url)
    db = Database(database_url)
    yield MemoryStore(db.engine)
    await db.close()
