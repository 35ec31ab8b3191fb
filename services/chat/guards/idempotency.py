"""Idempotent turns: a client-chosen request id makes a retried turn return the first result.

Per user, `begin` claims the id with `SET NX` (an in-flight marker that expires after
`idempotency_in_flight_ttl_s`, so a crashed turn does not block the id for a day).
- first time: returns None, the turn runs, then `complete` stores the final serialized
  response for `idempotency_ttl_s` (or `abandon` frees the id when the turn failed, so a
  retry runs again);
- a retry after completion: returns the stored bytes, the turn does not run again;
- a retry while the first one still runs: FAILED_PRECONDITION (reason TURN_IN_PROGRESS,
  "a turn with this request_id is still running"), which the client retries later. We do
  not wait here: a waiting duplicate would hold a server slot for a whole model call.
An optional fingerprint of the request (e.g. a hash of message and session) rejects reuse
of an id for a different request (INVALID_ARGUMENT).
Without Redis, turns run without deduplication (fail open; counted and logged).
"""

from __future__ import annotations

import hashlib

from parley.runtime.config import ChatSettings
from parley.runtime.errors import FailedPrecondition, InvalidArgument
from services.chat.guards.redis_guard import RedisDown, RedisGuard, user_key

_IN_FLIGHT = b"I"  # a stored result starts with b"R"
_FP_LEN = 16  # bytes of SHA-256 kept as the request fingerprint

# Store the result under the fingerprint the in-flight marker holds (ARGV[2] if the marker is gone).
_COMPLETE_LUA = """
local v = redis.call('GET', KEYS[1])
local fp = ARGV[2]
if v and string.len(v) >= 17 then fp = string.sub(v, 2, 17) end
redis.call('SET', KEYS[1], 'R' .. fp .. ARGV[1], 'EX', ARGV[3])
return 0
"""

# Delete the key only while it is still an in-flight marker (never a stored result).
_ABANDON_LUA = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'I' then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _key(user_id: str, request_id: str) -> str:
    return user_key("idem", user_id, hashlib.sha256(request_id.encode()).hexdigest()[:32])


def _fp(fingerprint: str) -> bytes:
    return hashlib.sha256(fingerprint.encode()).digest()[:_FP_LEN]


class Idempotency:
    def __init__(self, guard: RedisGuard, settings: ChatSettings) -> None:
        self.guard = guard
        self.settings = settings
        self._abandon = guard.script(_ABANDON_LUA)
        self._complete = guard.script(_COMPLETE_LUA)

    async def begin(self, user_id: str, request_id: str, fingerprint: str = "") -> bytes | None:
        """None: run the turn (and call complete/abandon). Bytes: the stored result to return."""
        if not request_id:
            return None
        key, fp = _key(user_id, request_id), _fp(fingerprint)
        try:
            claimed = await self.guard.run(
                "idempotency",
                lambda r: r.set(key, _IN_FLIGHT + fp, nx=True, ex=self.settings.idempotency_in_flight_ttl_s),
            )
            if claimed:
                return None
            stored = await self.guard.run("idempotency", lambda r: r.get(key))
        except RedisDown:
            self.guard.degrade("idempotency")
            return None
        if stored is None:  # it expired between SET and GET: claim it again
            return await self.begin(user_id, request_id, fingerprint)
        if stored[1 : 1 + _FP_LEN] != fp:
            raise InvalidArgument(
                message="request_id was already used for a different request; use a new request_id",
                violations={"request_id": "was already used for a different request"},
                reason="REQUEST_ID_REUSED",
            )
        if stored[:1] == _IN_FLIGHT:
            raise FailedPrecondition(
                message="a turn with this request_id is still running; retry later to get its result",
                reason="TURN_IN_PROGRESS",
            )
        return stored[1 + _FP_LEN :]

    async def complete(self, user_id: str, request_id: str, result: bytes, fingerprint: str = "") -> None:
        """Store the turn's final result (e.g. `ChatResponse.SerializeToString()`). Never raises.

        The fingerprint given to `begin` is kept; `fingerprint` only matters if the marker expired."""
        if not request_id:
            return
        args = [result, _fp(fingerprint), self.settings.idempotency_ttl_s]
        try:
            await self.guard.run(
                "idempotency", lambda _r: self._complete(keys=[_key(user_id, request_id)], args=args)
            )
        except RedisDown:
            self.guard.degrade("idempotency")

    async def abandon(self, user_id: str, request_id: str) -> None:
        """The turn failed: free the id so that a retry runs again. Never raises."""
        if not request_id:
            return
        try:
            await self.guard.run("idempotency", lambda _r: self._abandon(keys=[_key(user_id, request_id)]))
        except RedisDown:
            self.guard.degrade("idempotency")
