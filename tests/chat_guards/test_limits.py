"""Rate limits (token buckets), budgets and usage rows against the real Redis and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from parley.runtime.errors import ResourceExhausted
from services.chat.guards.budget import BudgetGuard
from services.chat.guards.ratelimit import RateLimiter
from services.chat.guards.usage import UsageRecorder
from tests.chat_guards.conftest import counter_value, new_user, redis_guard


async def test_requests_per_minute(redis_url, chat, metrics):
    settings = chat(rate_limit_requests_per_min=3, rate_limit_tokens_per_min=0)
    async with redis_guard(redis_url, settings, metrics) as guard:
        limits, user = RateLimiter(guard, settings, metrics), new_user()
        for _ in range(3):
            await limits.acquire(user, 100)
        with pytest.raises(ResourceExhausted) as exc:
            await limits.acquire(user, 100)
        assert exc.value.message.startswith(f"rate limit of 3 requests per minute reached for user {user!r}; retry in")
        assert exc.value.reason == "RATE_LIMITED"
        assert 15 < exc.value.retry_after_s <= 20  # one request refills in 60/3 s
        await limits.acquire(new_user(), 100)  # per user
        assert counter_value(metrics, "parley_chat_rate_limited", limit="requests") == 1


async def test_tokens_per_minute_estimate_then_charge(redis_url, chat, metrics):
    settings = chat(rate_limit_requests_per_min=0, rate_limit_tokens_per_min=1000)
    async with redis_guard(redis_url, settings, metrics) as guard:
        limits, user = RateLimiter(guard, settings, metrics), new_user()
        await limits.acquire(user, 5000)  # larger than the bucket: needs a full bucket, passes
        await limits.charge(user, 1500)  # the real count: 500 tokens in debt
        with pytest.raises(ResourceExhausted) as exc:
            await limits.acquire(user, 0)
        assert "1000 tokens per minute" in exc.value.message
        assert 29 < exc.value.retry_after_s <= 30  # 500 tokens at 1000/min
        with pytest.raises(ResourceExhausted) as exc:
            await limits.acquire(user, 500)
        assert 59 < exc.value.retry_after_s <= 60


async def test_budget_check_before_charge_after(redis_url, engine, chat, metrics):
    settings = chat(budget_daily_usd=0.01, budget_monthly_usd=1.0)
    usage = UsageRecorder(engine, metrics)
    async with redis_guard(redis_url, settings, metrics) as guard:
        budget, user = BudgetGuard(guard, settings, usage, metrics), new_user()
        await budget.check(user)
        await budget.charge(user, 0.006)
        await budget.check(user)  # 0.006 < 0.01: one more turn may run
        await budget.charge(user, 0.006)  # ... and overshoot
        with pytest.raises(ResourceExhausted) as exc:
            await budget.check(user)
        assert exc.value.reason == "BUDGET_EXCEEDED"
        assert exc.value.message.startswith(f"daily budget of $0.01 is used up for user {user!r} (spent $0.0120)")
        midnight = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        assert abs(exc.value.retry_after_s - (midnight - datetime.now(UTC)).total_seconds()) < 5
        assert await budget.spent(user) == {"daily": pytest.approx(0.012), "monthly": pytest.approx(0.012)}
        await budget.charge(user, None)  # unpriced: free


async def test_budget_rebuilds_from_usage_rows(redis_url, engine, chat, metrics):
    settings = chat(budget_monthly_usd=0.05)
    usage = UsageRecorder(engine, metrics)
    user = new_user()
    # Spend Redis never saw (e.g. Redis was flushed): last month's row does not count.
    assert await usage.record(user_id=user, model="m", cost_usd=0.03, priced=True, prompt_tokens=10)
    assert await usage.record(user_id=user, model="m", cost_usd=0.03, priced=True, kind="summary")
    assert await usage.record(user_id=user, model="m", cost_usd=None, priced=False)  # unpriced
    assert await usage.record(user_id=user, model="m", cache_hit=True, kind="cache", cost_usd=0.0, priced=True)
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO usage_records (user_id, model, cost_usd, priced, created_at) "
                                "VALUES (:u, 'm', 5, true, now() - interval '40 days')"), {"u": user})
    async with redis_guard(redis_url, settings, metrics) as guard:
        budget = BudgetGuard(guard, settings, usage, metrics)
        with pytest.raises(ResourceExhausted, match=r"monthly budget of \$0.05 is used up .*\(spent \$0.0600\)"):
            await budget.check(user)
        assert await guard.client.exists(f"parley:chat:spend:{{{user}}}:month:{datetime.now(UTC):%Y-%m}") == 1


async def test_usage_rows(engine, metrics):
    usage, user = UsageRecorder(engine, metrics), new_user()
    session = "7b0c3c1e-3f7a-4a57-9c43-1b2d3e4f5a6b"
    assert await usage.record(
        user_id=user, model="gpt-4o-mini", provider="openai", prompt_tokens=12, completion_tokens=30,
        cost_usd=0.00042, priced=True, estimated=False, latency_ms=812.5, tool_called="sales_report",
        session_id=session, request_id="req-1",
    )
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM usage_records WHERE user_id = :u"), {"u": user})).mappings().one()
    assert (str(row["session_id"]), row["request_id"], row["model"], row["provider"]) == (
        session, "req-1", "gpt-4o-mini", "openai")
    assert (row["prompt_tokens"], row["completion_tokens"], float(row["cost_usd"]), row["priced"]) == (
        12, 30, 0.00042, True)
    assert (row["kind"], row["cache_hit"], row["tool_called"], row["latency_ms"]) == (
        "generate", False, "sales_report", 812.5)
    assert await usage.spend_since(user, datetime.now(UTC) - timedelta(minutes=1)) == pytest.approx(0.00042)
    assert await usage.spend_since(user, datetime.now(UTC) + timedelta(minutes=1)) == 0
