"""The guard layer's own Redis client: short timeouts, one retry at most, and a breaker.

Every guard (rate limit, budget, idempotency, answer cache) talks to Redis through
`RedisGuard.run`. Connect and read timeouts are short (`guard_redis_timeout_s`); a broken
connection is retried once at once (a restarted Redis), a timeout never. A Redis error
never escapes as such: it becomes `RedisDown`, the breaker opens for
`guard_redis_breaker_s` (later calls skip Redis at once instead of waiting for another
timeout), one warning is logged per trip, and the caller applies its policy through
`degrade`: fail open (cache, idempotency, limits by default), fail closed (limits with
`limits_fail_closed`: UNAVAILABLE), or another source (budgets: the usage rows).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from parley.runtime.config import ChatSettings
from parley.runtime.errors import Unavailable
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics

_log = get_logger(__name__)
T = TypeVar("T")

KEY_PREFIX = "parley:chat:"


def user_key(kind: str, user_id: str, *rest: str) -> str:
    """`parley:chat:<kind>:{<user>}:...`: the braces keep a user's keys in one Redis Cluster slot
    (user ids cannot contain braces, see validation.USER_ID_RE)."""
    return ":".join([f"{KEY_PREFIX}{kind}", "{" + user_id + "}", *rest])


class RedisDown(Exception):
    """Redis did not answer (or the breaker is open); the caller decides to fail open or closed."""


class RedisGuard:
    def __init__(self, redis_url: str, settings: ChatSettings, metrics: Metrics) -> None:
        timeout = settings.guard_redis_timeout_s
        self.client: aioredis.Redis = aioredis.from_url(
            redis_url,
            decode_responses=False,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry on a broken connection (e.g. Redis restarted), none on a timeout.
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
            client_name="parley-chat-guards",
        )
        self.breaker_s = settings.guard_redis_breaker_s
        self._open_until = 0.0
        self._tripped = False
        self._degraded = metrics.counter(
            "parley_chat_guard_redis_degraded_total",
            "Guard operations that ran without Redis, by component and outcome (fail_open, fail_closed, database).",
            ["component", "outcome"],
        )

    def script(self, lua: str):
        """Register a Lua script once; calls use EVALSHA (and load it again if Redis lost it)."""
        return self.client.register_script(lua)

    @property
    def skipping(self) -> bool:
        return time.monotonic() < self._open_until

    async def run(self, component: str, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run `op(client)`; any Redis failure (or an open breaker) raises `RedisDown`."""
        if self.skipping:
            raise RedisDown("skipped: Redis failed recently")
        try:
            result = await op(self.client)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._open_until = time.monotonic() + self.breaker_s
            self._tripped = True
            _log.warning("guard_redis_unavailable", component=component, error=f"{type(exc).__name__}: {exc}",
                         skip_s=self.breaker_s)
            raise RedisDown(str(exc)) from exc
        if self._tripped:
            self._tripped = False
            _log.info("guard_redis_recovered", component=component)
        return result

    def degrade(self, component: str, *, fail_closed: bool = False, outcome: str = "") -> None:
        """Count a guard operation that ran without Redis; raise UNAVAILABLE when failing closed.

        `outcome` names a fallback other than failing open (e.g. "database")."""
        self._degraded.labels(component, outcome or ("fail_closed" if fail_closed else "fail_open")).inc()
        if fail_closed:
            raise Unavailable(
                message=f"{component} cannot be checked: Redis is unavailable; try again shortly",
                reason="GUARD_UNAVAILABLE",
                metadata={"component": component},
            )

    async def aclose(self) -> None:
        await self.client.aclose()
