"""Redis outages: a real private Redis is stopped mid-test (and a hung one never answers).

Cache and idempotency fail open, limits fail open or closed (setting), budgets fall back to
the usage rows in PostgreSQL; every skip is counted, and a dead Redis costs milliseconds.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from parley.runtime.errors import ResourceExhausted, Unavailable
from services.chat.guards.budget import BudgetGuard
from services.chat.guards.cache import AnswerCache
from services.chat.guards.idempotency import Idempotency
from services.chat.guards.ratelimit import RateLimiter
from services.chat.guards.usage import UsageRecorder
from tests.chat_guards.conftest import counter_value, new_user, redis_guard

DEGRADED = "parley_chat_guard_redis_degraded"


async def test_redis_down_fails_open_then_recovers(private_redis, engine, chat, metrics, caplog):
    settings = chat(rate_limit_requests_per_min=2, budget_daily_usd=0.01, guard_redis_breaker_s=0.3)
    usage = UsageRecorder(engine, metrics)
    async with redis_guard(private_redis.url, settings, metrics) as guard:
        limits, budget = RateLimiter(guard, settings, metrics), BudgetGuard(guard, settings, usage, metrics)
        cache, idem = AnswerCache(guard, settings, metrics), Idempotency(guard, settings)
        user, spender = new_user(), new_user()
        await limits.acquire(user, 10)
        await limits.acquire(user, 10)
        await budget.check(spender)
        await cache.put(user, "m", "hi", "", b"cached")

        await asyncio.to_thread(private_redis.stop, True)
        started = time.perf_counter()
        assert await cache.get(user, "m", "hi", "") is None  # a miss, not an error
        await cache.put(user, "m", "hi", "", b"x")
        await limits.acquire(user, 10)  # the bucket is empty, but limits fail open
        await limits.charge(user, 10)
        assert await idem.begin(user, "req-1") is None  # runs without deduplication
        await idem.complete(user, "req-1", b"r")
        await idem.abandon(user, "req-1")
        # The budget is read from the usage rows instead: a charge Redis never saw still counts.
        assert await usage.record(user_id=spender, model="m", cost_usd=0.02, priced=True)
        await budget.charge(spender, 0.02)
        with pytest.raises(ResourceExhausted, match=r"daily budget of \$0.01 is used up"):
            await budget.check(spender)
        await budget.check(new_user())
        assert time.perf_counter() - started < 1.0  # milliseconds per call, not socket timeouts

        assert counter_value(metrics, DEGRADED, component="cache", outcome="fail_open") == 2
        assert counter_value(metrics, DEGRADED, component="rate_limit", outcome="fail_open") == 2
        assert counter_value(metrics, DEGRADED, component="idempotency", outcome="fail_open") == 3
        assert counter_value(metrics, DEGRADED, component="budget", outcome="database") == 2
        warnings = [r for r in caplog.records if "guard_redis_unavailable" in str(r.msg)]
        assert 1 <= len(warnings) <= 2  # once per breaker trip, not once per call

        # Redis comes back with its old data: limits apply again, and the spend key Redis kept
        # (0, from before the outage) is rebuilt from PostgreSQL because a charge missed it.
        await asyncio.to_thread(private_redis.start)
        await asyncio.sleep(0.35)
        fresh = new_user()
        await limits.acquire(fresh, 10)  # the pool's broken connection is replaced at once
        await limits.acquire(fresh, 10)
        with pytest.raises(ResourceExhausted, match="rate limit of 2 requests per minute"):
            await limits.acquire(fresh, 10)
        with pytest.raises(ResourceExhausted, match=r"daily budget of \$0.01 is used up .*\(spent \$0.0200\)"):
            await budget.check(spender)


async def test_limits_fail_closed(private_redis, chat, metrics):
    settings = chat(limits_fail_closed=True, budget_daily_usd=1.0)
    async with redis_guard(private_redis.url, settings, metrics) as guard:
        limits = RateLimiter(guard, settings, metrics)
        budget = BudgetGuard(guard, settings, None, metrics)  # no usage rows to fall back on
        cache = AnswerCache(guard, settings, metrics)
        await asyncio.to_thread(private_redis.stop)
        with pytest.raises(Unavailable) as exc:
            await limits.acquire(new_user(), 10)
        assert exc.value.message == "rate_limit cannot be checked: Redis is unavailable; try again shortly"
        with pytest.raises(Unavailable, match="budget cannot be checked"):
            await budget.check(new_user())
        await limits.charge(new_user(), 10)  # after a turn: never raises
        await budget.charge(new_user(), 0.5)
        assert await cache.get(new_user(), "m", "hi", "") is None  # the cache still fails open
        assert counter_value(metrics, DEGRADED, component="rate_limit", outcome="fail_closed") == 1
        assert counter_value(metrics, DEGRADED, component="budget", outcome="fail_closed") == 1


async def test_hung_redis_costs_one_timeout_then_is_skipped(chat, metrics):
    """A server that accepts connections but never answers (e.g. a stuck Redis)."""
    settings = chat(guard_redis_timeout_s=0.2, guard_redis_breaker_s=30)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        async with redis_guard(url, settings, metrics) as guard:
            cache = AnswerCache(guard, settings, metrics)
            started = time.perf_counter()
            assert await cache.get(new_user(), "m", "hi", "") is None
            first = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(20):
                assert await cache.get(new_user(), "m", "hi", "") is None
            rest = time.perf_counter() - started
    assert 0.15 < first < 0.6
    assert rest < 0.05
    assert counter_value(metrics, DEGRADED, component="cache", outcome="fail_open") == 21
