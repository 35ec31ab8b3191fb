import pytest

from parley.chat.v1 import chat_pb2_grpc
from parley.runtime.clients import make_channel

ALL = ["memory", "inference", "tools", "chat"]


@pytest.fixture(scope="session")
async def chat_app(start_stack):
    """The whole stack with the real local model, embedded-free: the session's PostgreSQL and Redis."""
    async with start_stack(ALL) as app:
        yield app


@pytest.fixture(scope="session")
async def chat(chat_app):
    channel = make_channel(chat_app.address)
    yield chat_pb2_grpc.ChatServiceStub(channel)
    await channel.close()
