"""The context window of a turn: read while the turn's message is being stored, so with or without it."""

from __future__ import annotations

from services.chat.core import fit_window
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
