"""Per-user rate limits: requests per minute and tokens per minute, token buckets in Redis.

One Lua script (registered once, run with EVALSHA) keeps both buckets atomic across
processes, using Redis's clock. Before a turn, `acquire` takes one request and checks
that the token bucket holds the turn's estimate (without taking it); after the turn,
`charge` takes the real token count, and the bucket may go negative: the next turn then
waits until it has refilled. Each bucket holds one minute's worth and refills evenly.
"""

from __future__ import annotations

from parley.runtime.config import ChatSettings
from parley.runtime.errors import ResourceExhausted
from parley.runtime.metrics import Metrics
from services.chat.guards.redis_guard import RedisDown, RedisGuard, user_key

# KEYS[1]: request bucket, KEYS[2]: token bucket (hashes: level, ts).
# ARGV: mode ('acquire' or 'charge'), requests/min (0: off), tokens/min (0: off), tokens.
# Returns {verdict, retry_ms}; verdict 0: allowed, 1: request limit, 2: token limit.
_BUCKETS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if not l then return cap end
  return math.min(cap, l + math.max(0, now - ts) * cap / 60)
end
local function save(key, cap, l)
  redis.call('HSET', key, 'level', tostring(l), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end
local mode, rcap, tcap, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if mode == 'charge' then
  if tcap > 0 and n > 0 then save(KEYS[2], tcap, level(KEYS[2], tcap) - n) end
  return {0, 0}
end
local verdict, wait, r = 0, 0, 0
if rcap > 0 then
  r = level(KEYS[1], rcap)
  if r < 1 then verdict, wait = 1, (1 - r) * 60 / rcap end
end
if tcap > 0 then
  local need = math.min(n, tcap)
  local tk = level(KEYS[2], tcap)
  if tk < need and (need - tk) * 60 / tcap > wait then verdict, wait = 2, (need - tk) * 60 / tcap end
end
if verdict ~= 0 then return {verdict, math.ceil(wait * 1000)} end
if rcap > 0 then save(KEYS[1], rcap, r - 1) end
return {0, 0}
"""

_CHARS_PER_TOKEN = 4


def estimate_turn_tokens(message: str, settings: ChatSettings, max_tokens: int, default_max_tokens: int) -> int:
    """A pre-turn estimate: the message, the history window, and the completion limit."""
    return len(message) // _CHARS_PER_TOKEN + settings.history_token_budget + (max_tokens or default_max_tokens)


class RateLimiter:
    def __init__(self, guard: RedisGuard, settings: ChatSettings, metrics: Metrics) -> None:
        self.guard = guard
        self.settings = settings
        self._script = guard.script(_BUCKETS_LUA)
        self._rejected = metrics.counter(
            "parley_chat_rate_limited_total", "Turns rejected by a per-user rate limit, by limit.", ["limit"]
        )

    @property
    def enabled(self) -> bool:
        return self.settings.rate_limit_requests_per_min > 0 or self.settings.rate_limit_tokens_per_min > 0

    async def _run(self, user_id: str, mode: str, tokens: int, fail_closed: bool) -> list[int] | None:
        s = self.settings
        keys = [user_key("rl", user_id, "req"), user_key("rl", user_id, "tok")]
        args = [mode, s.rate_limit_requests_per_min, s.rate_limit_tokens_per_min, max(0, int(tokens))]
        try:
            return await self.guard.run("rate_limit", lambda _r: self._script(keys=keys, args=args))
        except RedisDown:
            self.guard.degrade("rate_limit", fail_closed=fail_closed)
            return None

    async def acquire(self, user_id: str, estimated_tokens: int) -> None:
        """Take one request; RESOURCE_EXHAUSTED (with retry delay) when a bucket is empty."""
        if not self.enabled:
            return
        result = await self._run(user_id, "acquire", estimated_tokens, self.settings.limits_fail_closed)
        if not result or int(result[0]) == 0:
            return
        verdict, retry_s = int(result[0]), int(result[1]) / 1000
        limit = "requests" if verdict == 1 else "tokens"
        per_min = self.settings.rate_limit_requests_per_min if verdict == 1 else self.settings.rate_limit_tokens_per_min
        self._rejected.labels(limit).inc()
        raise ResourceExhausted(
            message=f"rate limit of {per_min} {limit} per minute reached for user {user_id!r}; "
            f"retry in {retry_s:.1f} s",
            reason="RATE_LIMITED",
            retry_after_s=retry_s,
            metadata={"limit": f"{limit}_per_minute"},
        )

    async def charge(self, user_id: str, tokens: int) -> None:
        """Take the turn's real token count (all model calls) from the token bucket. Never raises:
        the turn is done (without Redis the tokens go uncounted, see the degraded counter)."""
        if self.settings.rate_limit_tokens_per_min > 0 and tokens > 0:
            await self._run(user_id, "charge", tokens, fail_closed=False)
