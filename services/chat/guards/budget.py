"""Per-user spending limits in US dollars, per UTC day and per UTC month.

`check` runs before a turn: it passes while spent < limit, so a user can exceed a limit
by at most the turns already in flight. `charge` runs after the turn with its real cost
(every model call of it: streamed, tool-using, summaries). Spend lives in Redis under
one key per period (`...:spend:{user}:day:2026-11-21`), incremented atomically and
expiring after the period ends. It is derivable from `usage_records`:
- a key that is missing (first turn of the period, Redis restarted or evicted it) is
  rebuilt from PostgreSQL before it is trusted;
- `charge` only increments keys that exist, so a rebuild never double-counts: the cost
  is in the usage row, which must be written BEFORE `charge` is called;
- while Redis is down, `check` sums the usage rows directly, and charges missed during
  the outage mark the user's keys stale (this process rebuilds them on the next check).
Unpriced model calls (cost unknown) do not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from parley.runtime.config import ChatSettings
from parley.runtime.errors import ResourceExhausted
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics
from services.chat.guards.redis_guard import RedisDown, RedisGuard, user_key
from services.chat.guards.usage import UsageRecorder

_log = get_logger(__name__)

# Increment only the period keys that exist (missing ones are rebuilt from PostgreSQL).
_CHARGE_LUA = """
for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then redis.call('INCRBYFLOAT', k, ARGV[1]) end
end
return 0
"""
_KEY_GRACE = timedelta(hours=1)  # keys outlive their period a little (clock skew between hosts)


@dataclass(frozen=True)
class Period:
    name: str  # "daily" or "monthly"
    limit_usd: float
    start: datetime
    end: datetime
    key: str


def _periods(user_id: str, settings: ChatSettings, now: datetime) -> list[Period]:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    out = []
    if settings.budget_daily_usd > 0:
        out.append(Period("daily", settings.budget_daily_usd, day, day + timedelta(days=1),
                          user_key("spend", user_id, "day", day.strftime("%Y-%m-%d"))))
    if settings.budget_monthly_usd > 0:
        out.append(Period("monthly", settings.budget_monthly_usd, month, next_month,
                          user_key("spend", user_id, "month", month.strftime("%Y-%m"))))
    return out


class BudgetGuard:
    def __init__(
        self, guard: RedisGuard, settings: ChatSettings, usage: UsageRecorder | None, metrics: Metrics
    ) -> None:
        self.guard = guard
        self.settings = settings
        self.usage = usage
        self._charge = guard.script(_CHARGE_LUA)
        self._stale: set[str] = set()  # users whose charges Redis missed (rebuild on next check)
        self._rejected = metrics.counter(
            "parley_chat_budget_exceeded_total", "Turns rejected by a per-user budget, by period.", ["period"]
        )

    async def check(self, user_id: str) -> None:
        """RESOURCE_EXHAUSTED (retry when the period resets) when a period's spend reached its limit."""
        now = datetime.now(UTC)
        periods = _periods(user_id, self.settings, now)
        if not periods:
            return
        spent = await self.spent(user_id, periods)
        if spent is None:
            return  # failing open (counted and logged)
        for p in periods:
            if spent[p.name] >= p.limit_usd:
                self._rejected.labels(p.name).inc()
                raise ResourceExhausted(
                    message=f"{p.name} budget of ${p.limit_usd:.2f} is used up for user {user_id!r} "
                    f"(spent ${spent[p.name]:.4f}); it resets at {p.end.isoformat()}",
                    reason="BUDGET_EXCEEDED",
                    retry_after_s=max(1.0, (p.end - now).total_seconds()),
                    metadata={"period": p.name},
                )

    async def charge(self, user_id: str, cost_usd: float | None) -> None:
        """Add a finished turn's cost (call after its usage rows are written). Never raises."""
        periods = _periods(user_id, self.settings, datetime.now(UTC))
        if not periods or not cost_usd or cost_usd <= 0:
            return
        keys = [p.key for p in periods]
        try:
            await self.guard.run("budget", lambda _r: self._charge(keys=keys, args=[f"{cost_usd:.10f}"]))
        except RedisDown:
            self._stale.add(user_id)
            self.guard.degrade("budget")

    async def spent(self, user_id: str, periods: list[Period] | None = None) -> dict[str, float] | None:
        """Spend per period name; None when it cannot be known and limits fail open."""
        periods = periods if periods is not None else _periods(user_id, self.settings, datetime.now(UTC))
        keys = [p.key for p in periods]
        try:
            if user_id in self._stale:
                await self.guard.run("budget", lambda r: r.delete(*keys))
            values = await self.guard.run("budget", lambda r: r.mget(keys))
        except RedisDown:
            return await self._from_database(user_id, periods)
        out: dict[str, float] = {}
        for p, value in zip(periods, values, strict=True):
            out[p.name] = float(value) if value is not None else await self._rebuild(user_id, p)
            if out[p.name] is None:
                return None
        self._stale.discard(user_id)
        return out

    async def _sum(self, user_id: str, since: datetime) -> float | None:
        if self.usage is None:
            return 0.0
        try:
            return await self.usage.spend_since(user_id, since)
        except (SQLAlchemyError, OSError) as exc:
            _log.warning("budget_rebuild_failed", user_id=user_id, error=f"{type(exc).__name__}: {exc}")
            return None

    async def _rebuild(self, user_id: str, p: Period) -> float | None:
        total = await self._sum(user_id, p.start)
        if total is None:
            self.guard.degrade("budget", fail_closed=self.settings.limits_fail_closed)
            return None
        expire_ms = int((p.end + _KEY_GRACE).timestamp() * 1000)
        try:
            created = await self.guard.run(
                "budget", lambda r: r.set(p.key, f"{total:.10f}", nx=True, pxat=expire_ms)
            )
            if not created:  # another turn rebuilt it first: its value may include a charge since
                value = await self.guard.run("budget", lambda r: r.get(p.key))
                total = float(value) if value is not None else total
        except RedisDown:
            pass  # the PostgreSQL sum is right anyway
        return total

    async def _from_database(self, user_id: str, periods: list[Period]) -> dict[str, float] | None:
        out: dict[str, float] = {}
        for p in periods:
            total = await self._sum(user_id, p.start) if self.usage is not None else None
            if total is None:
                self.guard.degrade("budget", fail_closed=self.settings.limits_fail_closed)
                return None
            out[p.name] = total
        self.guard.degrade("budget", outcome="database")
        self._stale.add(user_id)  # charges made now cannot reach Redis
        return out
