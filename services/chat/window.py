"""The recent window of a session: its newest messages within the history token budget.

A turn needs the window before it can call the model. It is read while the turn's message is being stored
(`fit_window` joins the two either way), or not read at all: `WindowCache` keeps each session's last window in
the chat process, and a turn uses it only when the append of its message proves that nothing else was stored in
the session since (the session's message count grew by exactly that one message). Any other writer, such as
another chat replica, an approval resumed elsewhere, or a direct AppendMessages, breaks that check, and the window
is read again. The window only ever slides forward (the budget is fixed and messages are never edited), so the
cached window plus the new messages, fitted to the budget, is exactly what a fresh read would return.

Recall must leave out the window, but it starts before the window is known (beside the append of the message,
whose token count the memory service computes). `plan_recall` leaves out, from the start, what is sure to stay
in the window, and asks for as many extra hits as there are messages that may or may not slide out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from services.chat.peers import PromptMessage


def newest_within(messages: list[PromptMessage], budget: int) -> list[PromptMessage]:
    """The newest of `messages` (oldest first) whose token counts sum to at most `budget`, oldest first: what the
    memory service's ListMessages returns for a token budget."""
    kept: list[PromptMessage] = []
    for m in reversed(messages):
        budget -= m.token_count
        if budget < 0:
            break
        kept.append(m)
    return kept[::-1]


def fit_window(earlier: list[PromptMessage], message: PromptMessage, budget: int) -> list[PromptMessage]:
    """The newest of `earlier` whose tokens fit `budget` with `message` (stored), then `message`, which is always
    there: it is what the model must answer. `earlier` (oldest first) may hold `message` or not: it was read while
    `message` was being stored."""
    others = [m for m in earlier if m.message_id != message.message_id]
    return [*newest_within(others, budget - message.token_count), message]


def slide(window: list[PromptMessage], added: list[PromptMessage], budget: int) -> list[PromptMessage]:
    """`window` after `added` (stored after it, oldest first) joined it: the newest that fit `budget`."""
    return newest_within([*window, *added], budget)


@dataclass
class RecallPlan:
    """What a turn's first Recall leaves out and asks for (see `plan_recall`)."""

    exclude: list[str]  # message ids surely in the window
    top_k: int  # hits to ask for: what the turn keeps, plus one per message that may be in the window or not


def max_tokens(text: str) -> int:
    """An upper bound of the tokens the memory service will count for `text`: a WordPiece token stands for at
    least one character of it; doubled, with room, for normalisations that split a character."""
    return 2 * len(text) + 8


def plan_recall(cached: list[PromptMessage] | None, message: PromptMessage, budget: int, keep: int,
                slack: int, limit: int) -> RecallPlan:
    """The first Recall of a turn whose window is `cached` (before `message`; None: unknown until read).

    Known window: its newest messages that fit `budget` even beside the largest possible `message` stay in the
    window whatever the message's token count is; they and `message` are left out. The older ones may slide out,
    so one more hit is asked for each, and those that stayed are dropped once the window is known: `keep` hits
    remain if the user has them. Unknown window: `slack` more hits, dropped the same way (if that leaves too few,
    the turn asks again, leaving the window out)."""
    if cached is None:
        return RecallPlan([], min(limit, keep + slack))
    sure = newest_within(cached, budget - max_tokens(message.content))
    return RecallPlan([m.message_id for m in sure if m.message_id] + [message.message_id],
                      min(limit, keep + len(cached) - len(sure)))


@dataclass
class _Entry:
    message_count: int  # the session's message count when `messages` were its window
    messages: list[PromptMessage]


class WindowCache:
    """The last window of up to `size` sessions (least recently used first out)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def peek(self, session_id: str) -> list[PromptMessage] | None:
        """The cached window of a session, if any (valid for this turn only if `earlier` says so later)."""
        entry = self._entries.get(session_id)
        return None if entry is None else entry.messages

    def earlier(self, session_id: str, message_count_after: int) -> list[PromptMessage] | None:
        """The window before this turn's message, if nothing but that one message was stored since it was
        cached (`message_count_after`: the session's count that the message's append answered with)."""
        entry = self._entries.get(session_id)
        if entry is None or entry.message_count + 1 != message_count_after:
            return None
        self._entries.move_to_end(session_id)
        return entry.messages

    def put(self, session_id: str, message_count: int, messages: list[PromptMessage]) -> None:
        if self._size <= 0:
            return
        self._entries[session_id] = _Entry(message_count, messages)
        self._entries.move_to_end(session_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop(self, session_id: str) -> None:
        self._entries.pop(session_id, None)
