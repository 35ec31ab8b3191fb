"""PostgreSQL adapter of the memory service. Every query is scoped by user_id."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import numpy as np
from pgvector.utils import HalfVector, Vector
from sqlalchemy import TextClause, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from parley.runtime.db import VECTOR_SCAN_SETTINGS, autocommit
from parley.runtime.embeddings import EMBEDDING_DIM
from parley.runtime.errors import AlreadyExists
from services.memory.records import (
    Chunk,
    Conversation,
    Document,
    Message,
    NewMessage,
    RecallQuery,
    Role,
    ToolCall,
    Visibility,
)

_UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
HNSW_EF_SEARCH = int(VECTOR_SCAN_SETTINGS["hnsw.ef_search"])  # set for every session by `Database`
HNSW_OVERFETCH = 4  # candidates per requested neighbour on the approximate recall plan
EXACT_SHORTLIST = 3  # half-precision candidates per requested neighbour that the exact plan re-ranks


# The query vector is a parameter cast to the column's type: PostgreSQL then types the parameter itself as vector
# (halfvec), and asyncpg sends it in that type's binary form (`Database` registers pgvector's codecs). A cast of a
# parameter of another type is an expression, and a generic plan (a prepared statement run often) computes it once
# per row: a binary float4[] cast to vector took 19 ms instead of 3 for 5,000 rows. For the same reason the halfvec
# copy is a parameter of its own (`qh`): one parameter cast to both types takes the type of its first use, and the
# other would be a cast of it (or worse, a vector rounded to half precision).
_QUERY_VECTOR = "CAST(:q AS vector)"
_QUERY_HALFVEC = "CAST(:qh AS halfvec)"


def vectors_param(rows: np.ndarray | Sequence[Sequence[float]]) -> list[Vector]:
    """Parameters of a `vector[]`: pgvector `Vector`s (a bare array would be taken for a dimension of the array)."""
    return [Vector(np.asarray(row, dtype=np.float32)) for row in rows]


def _conversation(row, prefix: str = "") -> Conversation:
    """A conversation from a row (its columns named `prefix` + column, when joined with others)."""
    return Conversation(**{field: getattr(row, prefix + field) for field in _CONVERSATION_FIELDS})


def _message(row) -> Message:
    return Message(
        id=row.id, seq=row.seq, conversation_id=row.conversation_id, user_id=row.user_id, role=Role(row.role),
        content=row.content, tool_calls=[ToolCall(**c) for c in row.tool_calls], tool_call_id=row.tool_call_id,
        token_count=row.token_count, metadata=row.metadata, created_at=row.created_at, embedded=row.embedded,
    )


def _document(row) -> Document:
    return Document(
        id=row.id, user_id=row.user_id, title=row.title, source=row.source, visibility=Visibility(row.visibility),
        chunk_count=row.chunk_count, metadata=row.metadata, created_at=row.created_at,
    )


_MESSAGE_COLUMNS = (
    "id, seq, conversation_id, user_id, role, content, tool_calls, tool_call_id, token_count, metadata, "
    "created_at, embedding IS NOT NULL AS embedded"
)
_CONVERSATION_FIELDS = ("id", "user_id", "title", "summary", "metadata", "message_count", "created_at", "updated_at")
_CONVERSATION_COLUMNS = ", ".join(_CONVERSATION_FIELDS)
_OWNER_AS_CONVERSATION = ", ".join(f"owner.{c} AS conversation_{c}" for c in _CONVERSATION_FIELDS)
_DOCUMENT_COLUMNS = "id, user_id, title, source, visibility, chunk_count, metadata, created_at"

# Statements of the hot paths, parsed once (text() scans its SQL for bind parameters at every construction).
_OWNED = text("SELECT coalesce(sum(message_count), 0) FROM conversations WHERE user_id = :user_id")
_APPEND = text(
    f"""
    WITH owner AS (
        UPDATE conversations SET message_count = message_count + :n, updated_at = now()
        WHERE id = :conversation_id AND user_id = :user_id RETURNING {_CONVERSATION_COLUMNS}
    ), stored AS (
        INSERT INTO messages (id, conversation_id, user_id, role, content, tool_calls, tool_call_id,
                              token_count, metadata)
        SELECT m.id, owner.id, :user_id, m.role, m.content, m.tool_calls::jsonb, m.tool_call_id,
               m.token_count, m.metadata::jsonb
        FROM owner, unnest(CAST(:ids AS uuid[]), CAST(:roles AS smallint[]),
                           CAST(:contents AS text[]), CAST(:tool_calls AS text[]),
                           CAST(:tool_call_ids AS text[]), CAST(:token_counts AS int[]),
                           CAST(:metadatas AS text[]))
             WITH ORDINALITY AS m(id, role, content, tool_calls, tool_call_id, token_count, metadata,
                                  ord)
        ORDER BY m.ord
        RETURNING {_MESSAGE_COLUMNS}
    )
    SELECT stored.*, {_OWNER_AS_CONVERSATION} FROM stored, owner ORDER BY stored.seq
    """
)
_SET_EMBEDDINGS = text(
    "UPDATE messages SET embedding = v.embedding "
    "FROM unnest(CAST(:ids AS uuid[]), CAST(:vectors AS vector[])) AS v(id, embedding) WHERE messages.id = v.id"
)


class MemoryStore:
    def __init__(self, engine: AsyncEngine, exact_recall_max_messages: int = 50_000,
                 derived_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        # Writes of recomputable data (vectors): `Database.derived_engine` commits them without waiting for the
        # WAL flush; without one they go through `engine`, durably.
        self.derived_engine = derived_engine or engine
        # Up to this many messages a user's recall is an exact scan of their rows (exact and fast: the
        # B-tree narrows to them); beyond it, the HNSW index with iterative scans answers.
        self.exact_recall_max_messages = exact_recall_max_messages

    def _autocommit(self, engine: AsyncEngine | None = None) -> AbstractAsyncContextManager[AsyncConnection]:
        """`db.autocommit` on `engine`, default the main one."""
        return autocommit(engine or self.engine)

    # -- conversations -------------------------------------------------------------------------

    async def create_conversation(self, user_id: str, title: str, metadata: dict[str, Any]) -> Conversation:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        f"INSERT INTO conversations (id, user_id, title, metadata) "
                        f"VALUES (:id, :user_id, :title, CAST(:metadata AS jsonb)) RETURNING {_CONVERSATION_COLUMNS}"
                    ),
                    {"id": uuid.uuid4(), "user_id": user_id, "title": title, "metadata": json.dumps(metadata)},
                )
            ).one()
        return _conversation(row)

    async def get_conversation(self, user_id: str, conversation_id: uuid.UUID) -> Conversation | None:
        async with self._autocommit() as conn:
            row = (
                await conn.execute(
                    text(f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = :id AND user_id = :user_id"),
                    {"id": conversation_id, "user_id": user_id},
                )
            ).one_or_none()
        return _conversation(row) if row else None

    async def list_conversations(
        self, user_id: str, limit: int, after: tuple[datetime, uuid.UUID] | None
    ) -> list[Conversation]:
        rows = await self._newest_first("conversations", _CONVERSATION_COLUMNS, "user_id = :user_id", "updated_at",
                                        user_id, limit, after)
        return [_conversation(r) for r in rows]

    async def _newest_first(self, table: str, columns: str, scope: str, time_column: str, user_id: str,
                            limit: int, after: tuple[datetime, uuid.UUID] | None) -> list:
        """One keyset page ordered by (time desc, id desc), starting after the given key."""
        where = scope
        params: dict[str, Any] = {"user_id": user_id, "limit": limit}
        if after:
            where += f" AND ({time_column}, id) < (:after_time, :after_id)"
            params.update(after_time=after[0], after_id=after[1])
        async with self._autocommit() as conn:
            return list(await conn.execute(
                text(f"SELECT {columns} FROM {table} WHERE {where} ORDER BY {time_column} DESC, id DESC LIMIT :limit"),
                params,
            ))

    async def update_conversation(
        self, user_id: str, conversation_id: uuid.UUID, changes: dict[str, Any]
    ) -> Conversation | None:
        sets = ["updated_at = now()"]
        params: dict[str, Any] = {"id": conversation_id, "user_id": user_id}
        for name, value in changes.items():
            if name == "metadata":
                sets.append("metadata = CAST(:metadata AS jsonb)")
                params["metadata"] = json.dumps(value)
            else:
                sets.append(f"{name} = :{name}")
                params[name] = value
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        f"UPDATE conversations SET {', '.join(sets)} WHERE id = :id AND user_id = :user_id "
                        f"RETURNING {_CONVERSATION_COLUMNS}"
                    ),
                    params,
                )
            ).one_or_none()
        return _conversation(row) if row else None

    async def delete_conversation(self, user_id: str, conversation_id: uuid.UUID) -> int | None:
        """Delete it with its messages (ON DELETE CASCADE); None when it is not the user's."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text("DELETE FROM conversations WHERE id = :id AND user_id = :user_id RETURNING message_count"),
                    {"id": conversation_id, "user_id": user_id},
                )
            ).one_or_none()
        return None if row is None else int(row.message_count)

    # -- messages ------------------------------------------------------------------------------

    async def append_messages(
        self, user_id: str, conversation_id: uuid.UUID, messages: list[NewMessage], token_counts: list[int],
        ids: list[uuid.UUID],
    ) -> tuple[list[Message], Conversation] | None:
        """Insert a turn atomically; the stored messages and the conversation as the append left it, or None (and
        nothing written) when the conversation is not the user's.

        One statement (its own transaction): the conversation's counters are bumped by a data-modifying CTE that
        only matches the caller's conversation, and the messages are inserted only if it did — one round trip.
        `ids` are the messages' ids. When one of them is stored already, the statement is undone as a whole, and a
        retry of an earlier append is recognised: see `_replayed`.
        """
        try:
            async with self._autocommit() as conn:
                rows = (await conn.execute(
                    _APPEND,
                    {
                        "n": len(messages),
                        "conversation_id": conversation_id,
                        "user_id": user_id,
                        "ids": ids,
                        "roles": [int(m.role) for m in messages],
                        "contents": [m.content for m in messages],
                        "tool_calls": [json.dumps([c.__dict__ for c in m.tool_calls]) for m in messages],
                        "tool_call_ids": [m.tool_call_id for m in messages],
                        "token_counts": token_counts,
                        "metadatas": [json.dumps(m.metadata) for m in messages],
                    },
                )).all()
        except IntegrityError as exc:
            if getattr(exc.orig, "sqlstate", None) != _UNIQUE_VIOLATION:  # the only unique key is the id
                raise
            return await self._replayed(user_id, conversation_id, ids)
        if not rows:
            return None
        return [_message(r) for r in rows], _conversation(rows[0], prefix="conversation_")

    async def _replayed(self, user_id: str, conversation_id: uuid.UUID,
                        ids: list[uuid.UUID]) -> tuple[list[Message], Conversation] | None:
        """An append whose ids are stored already: the same messages of the user's conversation when all of them
        are (a retried call, answered as the first one was), None when the conversation is not the user's, and
        AlreadyExists when an id belongs to some other message."""
        conversation = await self.get_conversation(user_id, conversation_id)
        if conversation is None:
            return None
        async with self._autocommit() as conn:
            rows = (await conn.execute(
                text(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ANY(CAST(:ids AS uuid[])) "
                     "AND conversation_id = :conversation_id AND user_id = :user_id ORDER BY seq"),
                {"ids": ids, "conversation_id": conversation_id, "user_id": user_id})).all()
        if len(rows) != len(ids):
            raise AlreadyExists("message_id: some of these ids are already used by other messages; use new ids, "
                                "or the very same messages to retry an append")
        return [_message(r) for r in rows], conversation

    async def set_embeddings(self, ids: list[uuid.UUID], vectors: np.ndarray) -> None:
        """Store the vectors (one row each, in `ids` order) of messages."""
        if not ids:
            return
        rows = np.asarray(vectors, dtype=np.float32).reshape(len(ids), EMBEDDING_DIM)
        async with self._autocommit(self.derived_engine) as conn:  # one statement, its own transaction
            await conn.execute(_SET_EMBEDDINGS, {"ids": ids, "vectors": vectors_param(rows)})

    async def pending_embeddings(self, limit: int, min_age_s: float = 0.0) -> list[tuple[uuid.UUID, str]]:
        """Messages stored without an embedding (embedding failed or the process died), oldest first; only those
        stored at least `min_age_s` ago (younger ones may have their vectors in flight)."""
        async with self._autocommit() as conn:
            rows = await conn.execute(
                text("SELECT id, content FROM messages WHERE embedding IS NULL AND btrim(content) <> '' "
                     "AND created_at <= now() - make_interval(secs => :min_age) ORDER BY seq LIMIT :limit"),
                {"limit": limit, "min_age": min_age_s},
            )
            return [(r.id, r.content) for r in rows]

    async def list_messages(
        self, user_id: str, conversation_id: uuid.UUID, limit: int, after_seq: int | None
    ) -> list[Message]:
        where = "conversation_id = :cid AND user_id = :user_id"
        params: dict[str, Any] = {"cid": conversation_id, "user_id": user_id, "limit": limit}
        if after_seq is not None:
            where += " AND seq > :after"
            params["after"] = after_seq
        async with self._autocommit() as conn:
            rows = await conn.execute(
                text(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where} ORDER BY seq LIMIT :limit"), params
            )
            return [_message(r) for r in rows]

    async def recent_messages_within(
        self, user_id: str, conversation_id: uuid.UUID, token_budget: int, limit: int
    ) -> list[Message]:
        """The newest messages whose token counts sum to at most the budget, oldest first."""
        async with self._autocommit() as conn:
            rows = await conn.execute(
                text(
                    f"""
                    SELECT * FROM (
                        SELECT {_MESSAGE_COLUMNS}, sum(token_count) OVER (ORDER BY seq DESC) AS running
                        FROM messages WHERE conversation_id = :cid AND user_id = :user_id
                        ORDER BY seq DESC LIMIT :limit
                    ) newest WHERE running <= :budget ORDER BY seq
                    """
                ),
                {"cid": conversation_id, "user_id": user_id, "budget": token_budget, "limit": limit},
            )
            return [_message(r) for r in rows]

    @staticmethod
    def recall_statements(q: RecallQuery) -> tuple[TextClause, TextClause, dict[str, Any]]:
        """(exact, approximate, params): the two plans of `recall` over the same filters."""
        where = ["user_id = :user_id", "role = ANY(CAST(:roles AS smallint[]))"]
        vector = np.asarray(q.vector, dtype=np.float32)
        params: dict[str, Any] = {
            "user_id": q.user_id,
            "q": Vector(vector),
            "qh": HalfVector(vector),  # the same vector, as the halfvec parameter (see _QUERY_HALFVEC)
            "roles": [int(r) for r in q.roles],
            "limit": q.top_k,
            # The approximate plan takes this many neighbours from the index and keeps the exact best top_k:
            # a relaxed-order iterative scan under a selective user filter finds good rows, not in order.
            "candidates": max(q.top_k * HNSW_OVERFETCH, HNSW_EF_SEARCH // 2),
            # The exact plan ranks by the half-precision copies, then re-ranks this many by the float4 vectors.
            "shortlist": max(q.top_k * EXACT_SHORTLIST, q.top_k + 20),
        }
        if q.conversation_ids:
            where.append("conversation_id = ANY(CAST(:cids AS uuid[]))")
            params["cids"] = q.conversation_ids
        if q.start_time:
            where.append("created_at >= :start_time")
            params["start_time"] = q.start_time
        if q.end_time:
            where.append("created_at < :end_time")
            params["end_time"] = q.end_time
        if q.exclude_ids:
            where.append("id <> ALL(CAST(:exclude AS uuid[]))")
            params["exclude"] = q.exclude_ids
        if q.exclude_recent_conversation and q.exclude_recent_count > 0:
            where.append(
                "id NOT IN (SELECT id FROM messages WHERE conversation_id = :xcid AND user_id = :user_id "
                "ORDER BY seq DESC LIMIT :xn)"
            )
            params.update(xcid=q.exclude_recent_conversation, xn=q.exclude_recent_count)
        approximate = text(
            f"SELECT {_MESSAGE_COLUMNS}, 1 - (embedding <=> {_QUERY_VECTOR}) AS score "
            f"FROM messages WHERE {' AND '.join(['embedding IS NOT NULL', *where])} "
            f"ORDER BY embedding <=> {_QUERY_VECTOR} LIMIT :candidates"
        )
        # Every row of the user is ranked. Ordered by a score, not by a distance operator, so the planner cannot
        # answer with an ANN index: the rows come from the covering (user_id, created_at) index, an index-only scan
        # over the user's contiguous leaf pages that carry half-precision vectors (migrations 0004, 0005). The
        # shortlist is then ranked by the float4 vectors: the scores returned are exact, and a neighbour that
        # float16 rounding moved a little down the order is still found.
        exact = text(
            f"WITH shortlist AS (SELECT id FROM messages "
            f"WHERE {' AND '.join(['embedding_half IS NOT NULL', *where])} "
            f"ORDER BY 1 - (embedding_half <=> {_QUERY_HALFVEC}) DESC LIMIT :shortlist) "
            f"SELECT {_MESSAGE_COLUMNS}, 1 - (embedding <=> {_QUERY_VECTOR}) AS score "
            f"FROM shortlist JOIN messages USING (id) ORDER BY score DESC LIMIT :limit"
        )
        return exact, approximate, params

    async def owned_messages(self, user_id: str) -> int:
        """How many messages `user_id` has: what `recall` chooses its plan by."""
        async with self._autocommit() as conn:
            return int((await conn.execute(_OWNED, {"user_id": user_id})).scalar_one())

    def recall_statement(self, q: RecallQuery, owned: int) -> tuple[TextClause, dict[str, Any]]:
        """The statement `recall` runs for a user with `owned` messages (exact up to `exact_recall_max_messages`,
        else approximate), and its parameters."""
        exact, approximate, params = self.recall_statements(q)
        return (exact if owned <= self.exact_recall_max_messages else approximate), params

    async def recall(self, q: RecallQuery, owned: int | None = None) -> list[tuple[Message, float]]:
        """The user's best matches; `owned`: their message count if the caller has it (`owned_messages`)."""
        if owned is None:
            owned = await self.owned_messages(q.user_id)
        statement, params = self.recall_statement(q, owned)
        async with self._autocommit() as conn:
            rows = (await conn.execute(statement, params)).all()
        # The approximate plan's candidates come in relaxed order: rank them exactly and keep top_k.
        hits = [(_message(r), float(r.score)) for r in rows if r.score >= q.min_score]
        return sorted(hits, key=lambda hit: -hit[1])[:q.top_k]

    # -- documents -----------------------------------------------------------------------------

    async def insert_document(
        self, doc: Document, chunks: list[str], vectors: np.ndarray | list[list[float]]
    ) -> Document:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        f"INSERT INTO documents (id, user_id, visibility, title, source, metadata, chunk_count) "
                        f"VALUES (:id, :user_id, :visibility, :title, :source, CAST(:metadata AS jsonb), :n) "
                        f"RETURNING {_DOCUMENT_COLUMNS}"
                    ),
                    {
                        "id": doc.id, "user_id": doc.user_id, "visibility": int(doc.visibility), "title": doc.title,
                        "source": doc.source, "metadata": json.dumps(doc.metadata), "n": len(chunks),
                    },
                )
            ).one()
            await conn.execute(
                text(
                    "INSERT INTO document_chunks (document_id, user_id, visibility, chunk_index, content, embedding) "
                    "SELECT :doc, :user_id, :visibility, c.ord - 1, c.content, c.e "
                    "FROM unnest(CAST(:contents AS text[]), CAST(:vectors AS vector[])) "
                    "WITH ORDINALITY AS c(content, e, ord)"
                ),
                {
                    "doc": doc.id, "user_id": doc.user_id, "visibility": int(doc.visibility),
                    "contents": chunks, "vectors": vectors_param(vectors),
                },
            )
        return _document(row)

    async def list_documents(
        self, user_id: str, limit: int, after: tuple[datetime, uuid.UUID] | None
    ) -> list[Document]:
        rows = await self._newest_first("documents", _DOCUMENT_COLUMNS, "(user_id = :user_id OR visibility = 2)",
                                        "created_at", user_id, limit, after)
        return [_document(r) for r in rows]

    async def delete_document(self, user_id: str, document_id: uuid.UUID) -> int | None:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text("DELETE FROM documents WHERE id = :id AND user_id = :user_id RETURNING chunk_count"),
                    {"id": document_id, "user_id": user_id},
                )
            ).one_or_none()
        return None if row is None else int(row.chunk_count)

    async def search_chunks(self, user_id: str, query: str, vector: np.ndarray | list[float],
                            top_k: int) -> list[Chunk]:
        """Hybrid search: pgvector cosine ranking and full-text ranking fused by reciprocal rank fusion.

        The text side matches any of the query's words (OR), ranked by ts_rank_cd: a question rarely
        contains only words the passage has, so AND semantics would leave it out of the text ranking.
        """
        candidates = max(top_k * 4, 20)
        sql = text(
            f"""
            WITH vec AS (
                SELECT id, row_number() OVER (ORDER BY distance) AS rank FROM (
                    SELECT id, embedding <=> {_QUERY_VECTOR} AS distance FROM document_chunks
                    WHERE user_id = :user_id OR visibility = 2
                    ORDER BY distance LIMIT :n
                ) v
            ), fts AS (
                SELECT id, row_number() OVER (ORDER BY text_rank DESC) AS rank FROM (
                    SELECT id, ts_rank_cd(tsv, query) AS text_rank
                    FROM document_chunks,
                         CAST(replace(CAST(plainto_tsquery('english', :text) AS text), '&', '|') AS tsquery) query
                    WHERE tsv @@ query AND (user_id = :user_id OR visibility = 2)
                    ORDER BY text_rank DESC LIMIT :n
                ) t
            ), fused AS (
                SELECT COALESCE(vec.id, fts.id) AS id,
                       COALESCE(1.0 / ({RRF_K} + vec.rank), 0) + COALESCE(1.0 / ({RRF_K} + fts.rank), 0) AS score
                FROM vec FULL OUTER JOIN fts ON vec.id = fts.id
            )
            SELECT c.document_id, c.chunk_index, c.content, d.title, d.source, fused.score
            FROM fused JOIN document_chunks c ON c.id = fused.id JOIN documents d ON d.id = c.document_id
            ORDER BY fused.score DESC, c.id LIMIT :k
            """
        )
        async with self._autocommit() as conn:
            rows = (
                await conn.execute(
                    sql, {"user_id": user_id, "q": Vector(np.asarray(vector, dtype=np.float32)), "text": query,
                          "n": candidates, "k": top_k}
                )
            ).all()
        return [
            Chunk(r.document_id, r.chunk_index, r.content, r.title, r.source, float(r.score)) for r in rows
        ]

    # -- users ---------------------------------------------------------------------------------

    async def delete_user(self, user_id: str) -> tuple[int, int, int]:
        async with self.engine.begin() as conn:
            messages = (
                await conn.execute(text("DELETE FROM messages WHERE user_id = :u"), {"u": user_id})
            ).rowcount
            conversations = (
                await conn.execute(text("DELETE FROM conversations WHERE user_id = :u"), {"u": user_id})
            ).rowcount
            documents = (
                await conn.execute(text("DELETE FROM documents WHERE user_id = :u"), {"u": user_id})
            ).rowcount
        return conversations, messages, documents
