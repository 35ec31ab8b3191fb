"""Exact-match answer cache in Redis.

The key covers the model, the normalised message (NFKC, case-folded, whitespace
collapsed) and a fingerprint of the context the caller passes (e.g. session history and
recalled message ids), scoped per user unless `cache_shared_across_users`. The value is
opaque bytes (the serialized response). A hit costs nothing: the caller marks the answer
`cache_hit` and records a zero-cost usage row. Without Redis: a miss, and `put` does
nothing (fail open). No semantic (embedding-similarity) cache: docs/chat-guards.md says why.
"""

from __future__ import annotations

import hashlib
import unicodedata

from parley.runtime.config import ChatSettings
from parley.runtime.metrics import Metrics
from services.chat.guards.redis_guard import KEY_PREFIX, RedisDown, RedisGuard, user_key


def normalize_message(message: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", message).casefold().split())


class AnswerCache:
    def __init__(self, guard: RedisGuard, settings: ChatSettings, metrics: Metrics) -> None:
        self.guard = guard
        self.settings = settings
        self._lookups = metrics.counter(
            "parley_chat_answer_cache_lookups_total", "Answer-cache lookups, by result (hit or miss).", ["result"]
        )

    @property
    def enabled(self) -> bool:
        return self.settings.cache_enabled

    def key(self, user_id: str, model: str, message: str, context_fingerprint: str) -> str:
        digest = hashlib.sha256(
            "\x00".join([model, normalize_message(message), context_fingerprint]).encode()
        ).hexdigest()
        if self.settings.cache_shared_across_users:
            return f"{KEY_PREFIX}cache:shared:{digest}"
        return user_key("cache", user_id, digest)

    async def get(self, user_id: str, model: str, message: str, context_fingerprint: str) -> bytes | None:
        if not self.enabled:
            return None
        key = self.key(user_id, model, message, context_fingerprint)
        try:
            value = await self.guard.run("cache", lambda r: r.get(key))
        except RedisDown:
            self.guard.degrade("cache")
            value = None
        self._lookups.labels("hit" if value is not None else "miss").inc()
        return value

    async def put(self, user_id: str, model: str, message: str, context_fingerprint: str, value: bytes) -> None:
        """Store an answer for `cache_ttl_s`. Never raises."""
        if not self.enabled:
            return
        key = self.key(user_id, model, message, context_fingerprint)
        try:
            await self.guard.run("cache", lambda r: r.set(key, value, ex=self.settings.cache_ttl_s))
        except RedisDown:
            self.guard.degrade("cache")
