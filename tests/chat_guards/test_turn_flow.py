"""The guards in the order the chat turn calls them, built by `open_guards(ctx)` (no model: the
"turn" is a stand-in that returns fixed bytes and usage)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from parley.runtime.app import ServiceContext
from parley.runtime.errors import PermissionDenied, ResourceExhausted
from parley.runtime.metrics import Metrics
from services.chat.guards import ChatGuards, estimate_turn_tokens, open_guards
from services.chat.guards.auth import create_api_key
from tests.chat_guards.conftest import new_user


async def guarded_turn(g: ChatGuards, metadata, user_id: str, request_id: str, message: str, ran: list) -> bytes:
    principal = await g.auth.authenticate(metadata)
    g.auth.authorize(principal, user_id)
    stored = await g.idempotency.begin(user_id, request_id, fingerprint=message)
    if stored is not None:
        return stored
    try:
        await g.limits.acquire(user_id, estimate_turn_tokens(message, g.limits.settings, 0, 256))
        await g.budget.check(user_id)
        cached = await g.cache.get(user_id, "m", message, "history-fp")
        if cached is not None:
            await g.usage.record(user_id=user_id, model="m", cost_usd=0.0, priced=True, cache_hit=True,
                                 kind="cache", request_id=request_id)
            result = cached
        else:
            ran.append(message)  # the model call
            result, tokens, cost = f"answer to {message}".encode(), 120, 0.004
            await g.usage.record(user_id=user_id, model="m", prompt_tokens=100, completion_tokens=20,
                                 cost_usd=cost, priced=True, request_id=request_id)
            await g.limits.charge(user_id, tokens)
            await g.budget.charge(user_id, cost)
            await g.cache.put(user_id, "m", message, "history-fp", result)
    except BaseException:
        await g.idempotency.abandon(user_id, request_id)
        raise
    await g.idempotency.complete(user_id, request_id, result)
    return result


async def test_guarded_turns(make_settings, database_url, private_redis, engine):
    # A Redis of its own: this test is about the order of the guards, not about a shared server's hiccups.
    settings = make_settings(chat={"auth_mode": "api_key", "budget_daily_usd": 0.01})
    async with AsyncExitStack() as stack:
        ctx = ServiceContext(settings, Metrics(), database_url, private_redis.url, {}, stack)
        g = await stack.enter_async_context(open_guards(ctx))
        user = new_user()
        md = [("authorization", f"Bearer {await create_api_key(engine, user)}")]
        ran: list[str] = []

        assert await guarded_turn(g, md, user, "r1", "Hello", ran) == b"answer to Hello"
        assert await guarded_turn(g, md, user, "r1", "Hello", ran) == b"answer to Hello"  # replayed
        assert await guarded_turn(g, md, user, "r2", "  hello ", ran) == b"answer to Hello"  # cache hit
        assert ran == ["Hello"]
        assert await guarded_turn(g, md, user, "r3", "Second", ran) == b"answer to Second"  # $0.004 spent
        assert await guarded_turn(g, md, user, "r4", "Third", ran) == b"answer to Third"  # $0.008 < $0.01: runs
        with pytest.raises(ResourceExhausted, match=r"daily budget .*spent \$0.0120"):
            await guarded_turn(g, md, user, "r5", "Fourth", ran)
        assert await g.idempotency.begin(user, "r5", fingerprint="Fourth") is None  # the failed id was freed
        with pytest.raises(PermissionDenied):
            await guarded_turn(g, md, new_user(), "r6", "Hello", ran)
