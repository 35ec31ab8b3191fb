"""The context window of a turn: read while the turn's message is being stored, so with or without it."""

from __future__ import annotations

from services.chat.window import WindowCache, fit_window, slide
from services.chat.peers import PromptMessage


def msg(i: int, tokens: int = 10, role: str = "user") -> PromptMessage:
    return PromptMessage(role, f"message {i}", message_id=f"id-{i}", token_count=tokens)


def test_the_same_window_whether_or_not_the_read_saw_the_new_message():
    earlier, new = [msg(i) for i in range(6)], msg(6)
    without, with_it = fit_window(earlier, new, 35), fit_window([*earlier, new], new, 35)
    assert [m.message_id for m in without] == [m.message_id for m in with_it] == ["id-4", "id-5", "id-6"]


def test_newest_messages_that_fit_the_budget_then_the_message():
    earlier = [msg(0, 5), msg(1, 30), msg(2, 5), msg(3, 5)]
    assert [m.message_id for m in fit_window(earlier, msg(4, 10), 30)] == ["id-2", "id-3", "id-4"]
    assert [m.message_id for m in fit_window(earlier, msg(4, 10), 1000)] == [f"id-{i}" for i in range(5)]


def test_a_message_over_the_budget_alone_is_still_the_window():
    assert [m.message_id for m in fit_window([msg(0)], msg(1, 500), 100)] == ["id-1"]
    assert [m.message_id for m in fit_window([], msg(1), 100)] == ["id-1"]


def test_a_window_slides_past_what_a_turn_stored():
    window = [msg(0), msg(1), msg(2)]
    assert [m.message_id for m in slide(window, [msg(3), msg(4)], 35)] == ["id-2", "id-3", "id-4"]
    assert [m.message_id for m in slide(window, [msg(3)], 1000)] == ["id-0", "id-1", "id-2", "id-3"]


def test_a_cached_window_serves_only_the_next_message_of_its_session():
    cache = WindowCache(size=2)
    cache.put("s1", 10, [msg(0)])
    assert cache.earlier("s1", 12) is None, "two messages since: someone else wrote"
    assert [m.message_id for m in cache.earlier("s1", 11)] == ["id-0"]
    cache.put("s2", 1, [msg(1)])
    cache.put("s3", 1, [msg(2)])
    assert "s1" not in cache and "s3" in cache, "least recently used out"
    cache.drop("s3")
    assert "s3" not in cache
    disabled = WindowCache(size=0)
    disabled.put("s1", 1, [msg(0)])
    assert "s1" not in disabled
