"""The recent window of a session: its newest messages within the history token budget.

A turn needs the window before it can call the model. It is read while the turn's message is being stored
(`fit_window` joins the two either way), or not read at all: `WindowCache` keeps each session's last window in
the chat process, and a turn uses it only when the append of its message proves that nothing else was stored in
the session since (the session's message count grew by exactly that one message). Any other writer, such as
another chat replica, an approval resumed elsewhere, or a direct AppendMessages, breaks that check, and the window
is read again. The window only ever slides forward (the budget is fixed and messages are never edited), so the
cached window plus the new messages, fitted to the budget, is exactly what a fresh read would return.
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
