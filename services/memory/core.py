"""The memory domain: validation, ownership, embeddings, and the store, with no gRPC in sight.

Writes never wait on an LLM. A turn is stored first (one transaction); its embeddings
are then computed (micro-batched with concurrent writers) and filled in. If embedding
fails, the messages stay stored and the `EmbeddingBackfill` worker retries them.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from parley.runtime import validation as v
from parley.runtime.config import MemorySettings
from parley.runtime.errors import NotFound
from parley.runtime.logging import get_logger
from services.memory.chunking import chunk_text
from parley.runtime.embeddings import Embedder
from services.memory.records import (
    Chunk,
    Conversation,
    Document,
    Message,
    NewMessage,
    RecallQuery,
    Role,
    Visibility,
)
from services.memory.store import MemoryStore

_log = get_logger(__name__)

MAX_MESSAGES_PER_APPEND = 64
MAX_TOOL_CALLS = 32
MAX_METADATA_CHARS = 16_384
MAX_TITLE_CHARS = 512
MAX_QUERY_CHARS = 4096
DEFAULT_CHUNK_TOKENS = 200
DEFAULT_CHUNK_OVERLAP = 40


@dataclass
class MessagePage:
    messages: list[Message]
    next_page_token: str


def _metadata(value: dict[str, Any], field: str) -> dict[str, Any]:
    import json

    if len(json.dumps(value)) > MAX_METADATA_CHARS:
        raise v.invalid(field, f"is larger than {MAX_METADATA_CHARS} characters of JSON")
    return value


class MemoryCore:
    def __init__(self, store: MemoryStore, embedder: Embedder, settings: MemorySettings) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings
        self._background: set[asyncio.Task] = set()
        self._vectors = VectorWriter(store, settings.vector_write_delay_ms / 1000)

    # -- conversations -------------------------------------------------------------------------

    async def create_conversation(self, user_id: str, title: str, metadata: dict[str, Any]) -> Conversation:
        v.user_id(user_id)
        v.text(title, "title", MAX_TITLE_CHARS, required=False)
        return await self.store.create_conversation(user_id, title, _metadata(metadata, "metadata"))

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation:
        v.user_id(user_id)
        cid = v.uuid_id(conversation_id, "conversation_id")
        found = await self.store.get_conversation(user_id, cid)
        if found is None:
            raise _not_found("conversation", conversation_id)
        return found

    async def list_conversations(self, user_id: str, page_size: int, page_token: str) -> tuple[list[Conversation], str]:
        """Most recently updated first, keyset-paged on (updated_at, id)."""
        return await _time_keyset_page(self.store.list_conversations, "ListConversations", user_id, page_size,
                                       page_token, lambda c: c.updated_at)

    async def update_conversation(
        self, user_id: str, conversation_id: str, changes: dict[str, Any], paths: list[str]
    ) -> Conversation:
        v.user_id(user_id)
        cid = v.uuid_id(conversation_id, "conversation_id")
        allowed = {"title", "summary", "metadata"}
        if not paths:
            raise v.invalid("update_mask", f"must name at least one of {', '.join(sorted(allowed))}")
        unknown = [p for p in paths if p not in allowed]
        if unknown:
            raise v.invalid("update_mask", f"cannot update {', '.join(unknown)}; updatable: {', '.join(sorted(allowed))}")
        selected = {p: changes[p] for p in paths}
        if "title" in selected:
            v.text(selected["title"], "title", MAX_TITLE_CHARS, required=False)
        if "summary" in selected:
            v.text(selected["summary"], "summary", self.settings.max_message_chars, required=False)
        if "metadata" in selected:
            _metadata(selected["metadata"], "metadata")
        updated = await self.store.update_conversation(user_id, cid, selected)
        if updated is None:
            raise _not_found("conversation", conversation_id)
        return updated

    async def delete_conversation(self, user_id: str, conversation_id: str) -> int:
        v.user_id(user_id)
        cid = v.uuid_id(conversation_id, "conversation_id")
        deleted = await self.store.delete_conversation(user_id, cid)
        if deleted is None:
            raise _not_found("conversation", conversation_id)
        return deleted

    # -- messages ------------------------------------------------------------------------------

    def _check_message(self, i: int, m: NewMessage) -> None:
        field = f"messages[{i}]"
        if m.role not in Role.__members__.values():
            raise v.invalid(f"{field}.role", "must be one of ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL")
        may_be_empty = m.role == Role.ASSISTANT and bool(m.tool_calls)
        v.text(m.content, f"{field}.content", self.settings.max_message_chars, required=not may_be_empty)
        if m.tool_calls and m.role != Role.ASSISTANT:
            raise v.invalid(f"{field}.tool_calls", "only assistant messages carry tool calls")
        if len(m.tool_calls) > MAX_TOOL_CALLS:
            raise v.invalid(f"{field}.tool_calls", f"at most {MAX_TOOL_CALLS} tool calls per message")
        for j, call in enumerate(m.tool_calls):
            if not call.id or not v.NAME_RE.match(call.name):
                raise v.invalid(f"{field}.tool_calls[{j}]", "needs an id and a tool name of [A-Za-z0-9_-]")
        if m.role == Role.TOOL and not m.tool_call_id:
            raise v.invalid(f"{field}.tool_call_id", "is required for a tool message")
        _metadata(m.metadata, f"{field}.metadata")

    async def append_messages(self, user_id: str, conversation_id: str, messages: list[NewMessage],
                              wait_for_embedding: bool = True) -> tuple[list[Message], Conversation]:
        """Store a turn atomically; its messages and the conversation as the append left it."""
        v.user_id(user_id)
        cid = v.uuid_id(conversation_id, "conversation_id")
        if not messages:
            raise v.invalid("messages", "must contain at least one message")
        if len(messages) > MAX_MESSAGES_PER_APPEND:
            raise v.invalid("messages", f"at most {MAX_MESSAGES_PER_APPEND} messages per call")
        for i, m in enumerate(messages):
            self._check_message(i, m)
        ids = [v.uuid_id(m.message_id, f"messages[{i}].message_id") if m.message_id else uuid.uuid4()
               for i, m in enumerate(messages)]
        if len(set(ids)) < len(ids):
            raise v.invalid("messages", "message_id values must differ from each other")
        counts = self.embedder.count_tokens([m.content for m in messages])
        # The embedding is computed while the turn is being written (it does not depend on the write),
        # and stored right after the commit.
        texts = [m.content for m in messages if m.content.strip()]
        embedding = asyncio.ensure_future(self.embedder.embed(texts, background=not wait_for_embedding))
        try:
            appended = await self.store.append_messages(user_id, cid, messages, counts, ids)
        except BaseException:
            embedding.cancel()
            raise
        if appended is None:
            embedding.cancel()
            raise _not_found("conversation", conversation_id)
        stored, conversation = appended
        todo = [m for m in stored if m.content.strip()]
        if wait_for_embedding:
            await self._fill_embeddings(todo, embedding, urgent=True)
        else:  # the turn is committed; its vectors follow (the backfill covers a crash in between)
            task = asyncio.create_task(self._fill_embeddings(todo, embedding, urgent=False))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return stored, conversation

    async def close(self) -> None:
        """Let embeddings in flight finish (briefly); whatever does not is left to the backfill."""
        self._vectors.flush_now()
        if self._background:
            await asyncio.wait(self._background, timeout=5)

    async def _fill_embeddings(self, todo: list[Message], embedding: asyncio.Future, urgent: bool) -> None:
        """Store the embeddings; on failure leave them to the backfill worker (the turn is already safe).
        `urgent`: the caller waits for them."""
        try:
            vectors = await embedding
            await self._vectors.write([m.id for m in todo], vectors, urgent=urgent)
        except Exception as exc:  # noqa: BLE001 - any failure here must not lose the stored turn
            _log.warning("embedding_deferred", messages=len(todo), error=str(exc))
            return
        for m in todo:
            m.embedded = True

    async def list_messages(
        self, user_id: str, conversation_id: str, page_size: int, page_token: str, token_budget: int,
        last_n: int = 0,
    ) -> tuple[list[Message], str]:
        v.user_id(user_id)
        cid = v.uuid_id(conversation_id, "conversation_id")
        limit = v.page_size(page_size)
        if token_budget < 0:
            raise v.invalid("token_budget", "must not be negative")
        if not 0 <= last_n <= v.MAX_PAGE_SIZE:
            raise v.invalid("last_n", f"must be between 0 and {v.MAX_PAGE_SIZE}")
        if (token_budget or last_n) and page_token:
            raise v.invalid("page_token", "cannot be combined with token_budget or last_n")
        if await self.store.get_conversation(user_id, cid) is None:
            raise _not_found("conversation", conversation_id)
        if token_budget or last_n:
            budget = token_budget or 2**31 - 1
            return await self.store.recent_messages_within(user_id, cid, budget, last_n or limit), ""
        scope = {"rpc": "ListMessages", "user_id": user_id, "conversation_id": str(cid)}
        position = v.decode_page_token(page_token, scope)
        rows = await self.store.list_messages(user_id, cid, limit + 1, int(position[0]) if position else None)
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = v.encode_page_token([rows[-1].seq], scope)
        return rows, token

    async def recall(self, query: str, q: RecallQuery) -> list[tuple[Message, float]]:
        v.user_id(q.user_id)
        v.text(query, "query", MAX_QUERY_CHARS)
        q.top_k = v.bounded_int(q.top_k, "top_k", 1, 100, 10)
        if not 0 <= q.min_score <= 1:
            raise v.invalid("min_score", "must be between 0 and 1")
        if q.start_time and q.end_time and q.start_time >= q.end_time:
            raise v.invalid("end_time", "must be after start_time")
        if q.exclude_recent_count < 0:
            raise v.invalid("exclude_recent_count", "must not be negative")
        q.roles = q.roles or [Role.USER, Role.ASSISTANT]
        # The plan's input (the user's message count) is read while the query is embedded: one round trip less
        # after the vector is known.
        owned, vectors = await asyncio.gather(self.store.owned_messages(q.user_id), self.embedder.embed([query]))
        q.vector = vectors[0]
        return await self.store.recall(q, owned)

    # -- documents -----------------------------------------------------------------------------

    async def ingest_document(
        self, user_id: str, title: str, source: str, content: str, visibility: Visibility,
        metadata: dict[str, Any], chunk_tokens: int, chunk_overlap: int,
    ) -> Document:
        v.user_id(user_id)
        v.text(title, "title", MAX_TITLE_CHARS, required=False)
        v.text(source, "source", 2048, required=False)
        v.text(content, "content", self.settings.max_document_chars)
        size = v.bounded_int(chunk_tokens, "chunk_tokens", 16, self.embedder.max_seq_length, DEFAULT_CHUNK_TOKENS)
        overlap = chunk_overlap or min(DEFAULT_CHUNK_OVERLAP, size // 4)
        if not 0 <= overlap < size:
            raise v.invalid("chunk_overlap", f"must be between 0 and {size - 1} (below chunk_tokens)")
        chunks = await asyncio.to_thread(chunk_text, content, self.embedder.new_tokenizer(), size, overlap)
        # Bulk: not ahead of recall queries; but the caller waits, so the pass does not wait for more texts.
        vectors = await self.embedder.embed(chunks, background=True, waited=True)
        doc = Document(
            id=uuid.uuid4(), user_id=user_id, title=title, source=source, visibility=visibility,
            chunk_count=len(chunks), metadata=_metadata(metadata, "metadata"), created_at=datetime.now(),
        )
        return await self.store.insert_document(doc, chunks, vectors)

    async def list_documents(self, user_id: str, page_size: int, page_token: str) -> tuple[list[Document], str]:
        """Newest first, keyset-paged on (created_at, id)."""
        return await _time_keyset_page(self.store.list_documents, "ListDocuments", user_id, page_size, page_token,
                                       lambda d: d.created_at)

    async def delete_document(self, user_id: str, document_id: str) -> int:
        v.user_id(user_id)
        did = v.uuid_id(document_id, "document_id")
        deleted = await self.store.delete_document(user_id, did)
        if deleted is None:
            raise _not_found("document", document_id)
        return deleted

    async def search_documents(self, user_id: str, query: str, top_k: int) -> list[Chunk]:
        v.user_id(user_id)
        v.text(query, "query", MAX_QUERY_CHARS)
        k = v.bounded_int(top_k, "top_k", 1, 100, 5)
        vector = (await self.embedder.embed([query]))[0]
        return await self.store.search_chunks(user_id, query, vector, k)

    async def delete_user(self, user_id: str) -> tuple[int, int, int]:
        v.user_id(user_id)
        return await self.store.delete_user(user_id)


async def _time_keyset_page(fetch, rpc: str, user_id: str, page_size: int, page_token: str, time_of):
    """One AIP-158 page of rows ordered by (time desc, id desc); the token holds the last row's key."""
    v.user_id(user_id)
    limit = v.page_size(page_size)
    scope = {"rpc": rpc, "user_id": user_id}
    position = v.decode_page_token(page_token, scope)
    after = (datetime.fromisoformat(position[0]), uuid.UUID(position[1])) if position else None
    rows = await fetch(user_id, limit + 1, after)
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, v.encode_page_token([time_of(rows[-1]).isoformat(), str(rows[-1].id)], scope)


def _not_found(kind: str, ident: str) -> NotFound:
    # Same answer whether it does not exist or belongs to someone else: ids are not an oracle.
    return NotFound(message=f"{kind} {ident} not found", metadata={"resource": kind})


class VectorWriter:
    """Stores computed vectors, coalescing concurrent writes into one UPDATE.

    While one UPDATE runs, the vectors of other turns queue up and go out together in the next, so 32 concurrent
    writers cost a few statements, not 32 (the same micro-batching the embedder does for forward passes).

    Vectors no caller waits for (`urgent=False`: an `async_embedding` append, whose turn goes on) wait up to
    `delay_s` for others before their UPDATE. Preparing the statement takes the event loop ~0.3-0.7 ms, and
    written at once it lands inside the turn that produced the vectors: a chat turn's message vector is ready when
    its recall and document search are next in line, its answer's right when the turn's response is. A write
    someone waits for goes out at once, with whatever is queued.
    """

    def __init__(self, store: MemoryStore, delay_s: float = 0.0) -> None:
        self._store = store
        self._delay = delay_s
        self._queued: list[tuple[list[uuid.UUID], np.ndarray, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._now = asyncio.Event()  # set: the next UPDATE goes out without waiting (one per flusher task)

    async def write(self, ids: list[uuid.UUID], vectors: np.ndarray, urgent: bool = True) -> None:
        done = asyncio.get_running_loop().create_future()
        self._queued.append((ids, vectors, done))
        if self._flusher is None or self._flusher.done():
            self._now = asyncio.Event()
            self._flusher = asyncio.create_task(self._flush(), name="vector-writer")
        if urgent:
            self._now.set()
        await asyncio.shield(done)

    def flush_now(self) -> None:
        """Write what is queued without waiting (shutdown)."""
        self._now.set()

    async def _flush(self) -> None:
        while self._queued:
            if self._delay and not self._now.is_set():
                try:
                    await asyncio.wait_for(self._now.wait(), self._delay)
                except TimeoutError:
                    pass
            self._now.clear()
            batch, self._queued = self._queued, []
            try:
                await self._store.set_embeddings([i for ids, _, _ in batch for i in ids],
                                                 np.concatenate([vectors for _, vectors, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - each writer sees the failure (and defers to the backfill)
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)


class EmbeddingBackfill:
    """Fills in embeddings that were not computed at write time (a failed or interrupted embed).

    Sweeps `embedding IS NULL` at start and then every `interval_s`, in batches, with
    tenacity retries (exponential backoff with jitter) around each batch. Messages younger than `min_age_s` are left
    alone: their vectors are normally in flight, and a sweep that wrote them too would embed them twice and race the
    vector writer's UPDATE of the same rows.
    """

    def __init__(self, store: MemoryStore, embedder: Embedder, interval_s: float = 30.0, batch: int = 256,
                 min_age_s: float = 10.0) -> None:
        self._store, self._embedder, self._interval, self._batch = store, embedder, interval_s, batch
        self._min_age = min_age_s
        self._task: asyncio.Task | None = None
        self.filled = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="embedding-backfill")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def run_once(self) -> int:
        filled = 0
        while True:
            pending = await self._store.pending_embeddings(self._batch, self._min_age)
            todo = [(mid, content) for mid, content in pending if content.strip()]
            if not todo:
                return filled
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(5),
                wait=wait_exponential_jitter(initial=0.5, max=10),
                retry=retry_if_exception_type(Exception),
                reraise=True,
            ):
                with attempt:
                    vectors = await self._embedder.embed([c for _, c in todo], background=True)
                    await self._store.set_embeddings([mid for mid, _ in todo], vectors)
            filled += len(todo)
            self.filled += len(todo)
            if len(pending) < self._batch:
                return filled

    async def _loop(self) -> None:
        while True:
            try:
                filled = await self.run_once()
                if filled:
                    _log.info("embeddings_backfilled", messages=filled)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep sweeping; the next pass retries
                _log.warning("embedding_backfill_failed", error=str(exc))
            await asyncio.sleep(self._interval)
