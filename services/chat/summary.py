"""Rolling summaries: turns that fell out of the context window are folded into the conversation's summary.

The recent window is what fits `history_token_budget`. When at least `summary_batch`
messages before the window are not yet in the summary, the summarizer asks the inference
service to merge them into the existing summary and stores the result (and how many
messages it covers, in the conversation's metadata) through the memory service.
"""

from __future__ import annotations

import time

from parley.memory.v1 import memory_pb2 as mpb
from parley.runtime.config import ChatSettings
from parley.runtime.protoconv import from_struct
from parley.runtime.validation import MAX_PAGE_SIZE
from services.chat.agent import ModelCall
from services.chat.peers import InferencePeer, MemoryPeer, PromptMessage

COVERED_KEY = "parley_summarized_messages"
PROMPT = (
    "Update the running summary of a conversation. Keep every fact about the user (name, preferences, plans) and "
    "every decision. Write at most 120 words, in the third person."
)


class Summarizer:
    def __init__(self, settings: ChatSettings, memory: MemoryPeer, inference: InferencePeer) -> None:
        self.settings = settings
        self.memory = memory
        self.inference = inference

    def due(self, session: mpb.Conversation, window: int, added: int = 0) -> bool:
        """Whether `summary_batch` messages before the window (of `window` messages) are not summarised yet,
        counting `added` messages stored since `session` was read."""
        covered = int(from_struct(session.metadata).get(COVERED_KEY, 0))
        return session.message_count + added - window - covered >= self.settings.summary_batch

    async def maybe_summarize(self, user_id: str, session: mpb.Conversation, window: int,
                              model: str) -> ModelCall | None:
        """Fold messages older than the window into the summary; returns the model call it made, if any."""
        if not self.due(session, window):
            return None
        metadata = from_struct(session.metadata)
        covered = int(metadata.get(COVERED_KEY, 0))
        outside = session.message_count - window
        older = await self._unsummarised(user_id, session, covered, outside)
        fresh = [m for m in older if m.content]
        transcript = "\n".join(f"{PromptMessage.from_memory(m).role}: {m.content[:1000]}" for m in fresh)
        request = self.inference.request(
            model,
            [PromptMessage("system", PROMPT),
             PromptMessage("user", f"Summary so far:\n{session.summary or '(none)'}\n\nNew messages:\n{transcript}")],
            [], self.settings.summary_max_tokens, 0.0)
        started = time.perf_counter()
        response = await self.inference.generate(request)
        summary = response.message.content.strip()
        if summary:
            await self.memory.update_summary(user_id, session.conversation_id, summary,
                                             {**metadata, COVERED_KEY: outside})
        u = response.usage
        return ModelCall(response.model, response.provider, u.prompt_tokens, u.completion_tokens, u.cost.cost_usd,
                         u.cost.priced, u.estimated, (time.perf_counter() - started) * 1000)

    async def _unsummarised(self, user_id: str, session: mpb.Conversation, covered: int,
                            outside: int) -> list[mpb.Message]:
        """The session's messages `covered` to `outside` (positions, oldest first): those before the window that
        the summary does not cover yet.

        One call reads the newest `message_count - covered` messages (what is new, then the window), whatever
        the session's length. If the session grew meanwhile (another writer stored in it), those are not the
        same messages: then, as for a range longer than a page, the session is read from its first message.
        """
        newest = session.message_count - covered
        if 0 < newest <= MAX_PAGE_SIZE:
            page = await self.memory.last_messages(user_id, session.conversation_id, newest)
            if len(page) == newest:
                now = await self.memory.get_session(user_id, session.conversation_id)
                if now.message_count == session.message_count:
                    return page[:outside - covered]
        older: list[mpb.Message] = []
        token = ""
        while len(older) < outside:  # pages of at most MAX_PAGE_SIZE (the memory service's limit)
            page = await self.memory.list_messages(user_id, session.conversation_id,
                                                   page_size=min(outside - len(older), MAX_PAGE_SIZE), page_token=token)
            older.extend(page.messages)
            token = page.next_page_token
            if not token:
                break
        return older[covered:outside]
