"""The context window of a turn: read while the turn's message is being stored, so with or without it."""

from __future__ import annotations

from services.chat.window import RecallPlan, WindowCache, fit_window, max_tokens, plan_recall, slide
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


def test_recall_leaves_out_what_surely_stays_in_the_window_and_asks_one_more_per_uncertain_message():
    new = PromptMessage("user", "x" * 10, message_id="id-new")  # at most 2 * 10 + 8 = 28 tokens
    cached = [msg(i) for i in range(6)]  # 60 tokens
    plan = plan_recall(cached, new, budget=60, keep=4, slack=8, limit=100)
    # 60 - 28 = 32 tokens surely stay beside the message: the newest three; the other three may slide out
    assert plan.exclude == ["id-3", "id-4", "id-5", "id-new"] and plan.top_k == 4 + 3
    # whatever the message's real token count, the window keeps every message the plan left out
    for tokens in range(0, 29):
        stored = PromptMessage("user", new.content, message_id="id-new", token_count=tokens)
        assert set(plan.exclude) <= {m.message_id for m in fit_window(cached, stored, 60)}


def test_recall_plan_of_a_new_session_an_unknown_window_and_a_large_one():
    new = PromptMessage("user", "hello", message_id="id-new")
    assert plan_recall([], new, budget=500, keep=4, slack=8, limit=100) == RecallPlan(["id-new"], 4)
    assert plan_recall(None, new, budget=500, keep=4, slack=8, limit=100) == RecallPlan([], 12)
    many, long = [msg(i, tokens=1) for i in range(300)], PromptMessage("user", "y" * 100, message_id="id-long")
    plan = plan_recall(many, long, budget=300, keep=4, slack=8, limit=100)
    assert len(plan.exclude) == 300 - max_tokens(long.content) + 1, "the newest 92, and the message"
    assert plan.top_k == 100, "4 + 208 capped at RecallRequest.top_k's bound; the turn asks again if too few are kept"
