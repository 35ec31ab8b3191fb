"""The chat service's guard layer: who may call, how much, how often, and what it cost.

`open_guards(ctx)` builds every guard once over the process's shared resources; the chat
turn calls them in order (see docs/chat-guards.md):
auth -> idempotency -> rate limit -> budget -> answer cache -> (turn) -> usage rows ->
charge tokens and cost -> cache put -> idempotency complete (abandon on failure).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from parley.runtime.app import ServiceContext
from services.chat.guards.auth import Authenticator, Principal, check_bind_safety
from services.chat.guards.budget import BudgetGuard
from services.chat.guards.cache import AnswerCache
from services.chat.guards.idempotency import Idempotency
from services.chat.guards.ratelimit import RateLimiter, estimate_turn_tokens
from services.chat.guards.redis_guard import RedisGuard
from services.chat.guards.usage import UsageRecorder

__all__ = [
    "ChatGuards", "Principal", "check_bind_safety", "estimate_turn_tokens", "open_guards",
]


@dataclass
class ChatGuards:
    auth: Authenticator
    limits: RateLimiter
    budget: BudgetGuard
    idempotency: Idempotency
    cache: AnswerCache
    usage: UsageRecorder
    redis: RedisGuard


@asynccontextmanager
async def open_guards(ctx: ServiceContext) -> AsyncIterator[ChatGuards]:
    """All guards over ctx's database, a dedicated short-timeout Redis client and ctx.metrics."""
    if not ctx.redis_url:
        raise RuntimeError("REDIS_URL is not set and no embedded Redis was started")
    settings, metrics, engine = ctx.settings.chat, ctx.metrics, ctx.database.engine
    redis = RedisGuard(ctx.redis_url, settings, metrics)
    usage = UsageRecorder(engine, metrics)
    try:
        yield ChatGuards(
            auth=Authenticator(settings, engine, metrics),
            limits=RateLimiter(redis, settings, metrics),
            budget=BudgetGuard(redis, settings, usage, metrics),
            idempotency=Idempotency(redis, settings),
            cache=AnswerCache(redis, settings, metrics),
            usage=usage,
            redis=redis,
        )
    finally:
        await redis.aclose()
