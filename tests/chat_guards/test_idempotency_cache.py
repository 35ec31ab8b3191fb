"""Idempotent turns and the exact-match answer cache against the real Redis."""

from __future__ import annotations

import pytest

from parley.runtime.errors import FailedPrecondition, InvalidArgument
from services.chat.guards.cache import AnswerCache, normalize_message
from services.chat.guards.idempotency import Idempotency
from tests.chat_guards.conftest import counter_value, new_user, redis_guard


async def test_idempotent_turn(redis_url, chat, metrics):
    settings = chat(idempotency_ttl_s=120)
    async with redis_guard(redis_url, settings, metrics) as guard:
        idem, alice, bob = Idempotency(guard, settings), new_user(), new_user()
        assert await idem.begin(alice, "req-1", fingerprint="hello|s1") is None  # run it
        with pytest.raises(FailedPrecondition) as exc:
            await idem.begin(alice, "req-1", fingerprint="hello|s1")
        assert exc.value.message == "a turn with this request_id is still running; retry later to get its result"
        assert exc.value.reason == "TURN_IN_PROGRESS"
        assert await idem.begin(bob, "req-1") is None  # scoped per user

        await idem.complete(alice, "req-1", b"\x0a\x05first")
        assert await idem.begin(alice, "req-1", fingerprint="hello|s1") == b"\x0a\x05first"
        assert await idem.begin(alice, "req-1", fingerprint="hello|s1") == b"\x0a\x05first"
        [key] = await guard.client.keys(f"parley:chat:idem:{{{alice}}}:*")
        assert 100 < await guard.client.ttl(key) <= 120
        with pytest.raises(InvalidArgument) as exc:
            await idem.begin(alice, "req-1", fingerprint="something else")
        assert exc.value.violations == {"request_id": "was already used for a different request"}

        await idem.abandon(alice, "req-1")  # a stored result is never abandoned
        assert await idem.begin(alice, "req-1", fingerprint="hello|s1") == b"\x0a\x05first"

        # A failed turn frees its id: the retry runs again.
        assert await idem.begin(bob, "req-2") is None
        await idem.abandon(bob, "req-2")
        assert await idem.begin(bob, "req-2") is None
        await idem.complete(bob, "req-2", b"")  # an empty response round-trips
        assert await idem.begin(bob, "req-2") == b""
        assert await idem.begin(bob, "") is None  # no request id: no deduplication


def test_normalize_message():
    assert normalize_message("  ＨＥＬＬＯ\u00a0\tWorld \n") == "hello world"
    assert normalize_message("Straße") == normalize_message("STRASSE")


async def test_answer_cache(redis_url, chat, metrics):
    settings = chat(cache_ttl_s=60)
    async with redis_guard(redis_url, settings, metrics) as guard:
        cache, alice, bob = AnswerCache(guard, settings, metrics), new_user(), new_user()
        assert await cache.get(alice, "m", "What is 2+2?", "ctx1") is None
        await cache.put(alice, "m", "What is 2+2?", "ctx1", b"four")
        assert await cache.get(alice, "m", "  what IS 2+2? ", "ctx1") == b"four"
        assert await cache.get(alice, "other-model", "What is 2+2?", "ctx1") is None
        assert await cache.get(alice, "m", "What is 2+2?", "ctx2") is None
        assert await cache.get(bob, "m", "What is 2+2?", "ctx1") is None  # per user by default
        assert 50 < await guard.client.ttl(cache.key(alice, "m", "What is 2+2?", "ctx1")) <= 60
        assert counter_value(metrics, "parley_chat_answer_cache_lookups", result="hit") == 1
        assert counter_value(metrics, "parley_chat_answer_cache_lookups", result="miss") == 4

        shared_settings = chat(cache_shared_across_users=True)
        shared = AnswerCache(guard, shared_settings, metrics)
        await shared.put(alice, "m", "Capital of France?", "", b"Paris")
        assert await shared.get(bob, "m", "capital of france?", "") == b"Paris"

        off = AnswerCache(guard, chat(cache_enabled=False), metrics)
        await off.put(alice, "m", "x", "", b"y")
        assert await off.get(alice, "m", "x", "") is None
