"""The exact recall plan shortlists by half-precision vectors and ranks by float4 ones (migration 0005): its
order and scores are those of the float4 vectors, message rows keep both vectors in line, and the migration
fills in and takes away the half-precision copies of stored messages."""

from __future__ import annotations

import re
import uuid

import numpy as np
from pgvector.utils import HalfVector, Vector
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from parley.runtime.db import downgrade, migrate
from services.memory.records import NewMessage, RecallQuery, Role
from services.memory.store import MemoryStore

DIM = 384


async def _messages(store: MemoryStore, user: str, contents: list[str]) -> list[uuid.UUID]:
    conv = await store.create_conversation(user, "", {})
    ids = [uuid.uuid4() for _ in contents]
    await store.append_messages(user, conv.id, [NewMessage(Role.USER, c) for c in contents],
                                [len(c.split()) for c in contents], ids)
    return ids


def _query(user: str, vector: np.ndarray, top_k: int) -> RecallQuery:
    return RecallQuery(user_id=user, vector=vector.tolist(), top_k=top_k, min_score=0.0, conversation_ids=[],
                       roles=[Role.USER], start_time=None, end_time=None, exclude_ids=[],
                       exclude_recent_conversation=None, exclude_recent_count=0)


async def test_exact_recall_orders_and_scores_by_the_float4_vectors(store):
    """40 vectors whose similarities to the query are 1e-5 apart: float16 rounding reorders them, the recall does
    not."""
    rng = np.random.default_rng(11)
    query = rng.standard_normal(DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    vectors, order = [], rng.permutation(40)
    for i in range(40):
        other = rng.standard_normal(DIM)
        other -= other.dot(query) * query
        other /= np.linalg.norm(other)
        cos = 0.9 - 1e-5 * order[i]  # similarities 0.9 - k * 1e-5, in random order
        vectors.append(cos * query + np.sqrt(1 - cos**2) * other)
    vectors = np.array(vectors, dtype=np.float32)
    user = f"halfvec-{uuid.uuid4().hex[:8]}"
    ids = await _messages(store, user, [f"near twin {i}" for i in range(40)])
    await store.set_embeddings(ids, vectors)

    exact = vectors @ query
    top = np.argsort(-exact)[:10]
    half = vectors.astype(np.float16).astype(np.float32) @ query.astype(np.float16).astype(np.float32)
    assert list(np.argsort(-half)[:10]) != list(top), "the test data must be reordered by float16 rounding"

    hits = await store.recall(_query(user, query, 10))
    assert [m.id for m, _ in hits] == [ids[i] for i in top]
    assert np.allclose([score for _, score in hits], exact[top], rtol=0, atol=1e-6), "scores of the float4 query"


async def test_message_rows_keep_both_vectors_in_line(store):
    """A row with two vectors passes the default 2 KB TOAST threshold; only a long content leaves the row."""
    long = " ".join(f"{uuid.uuid4()}" for _ in range(200))  # ~7 KB that barely compresses
    ids = await _messages(store, f"inline-{uuid.uuid4().hex[:8]}", ["a short message", long])
    await store.set_embeddings(ids, np.full((2, DIM), 1 / np.sqrt(DIM), dtype=np.float32))
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT content, pg_column_toast_chunk_id(content) AS content_toast, "
            "pg_column_toast_chunk_id(embedding) AS vector_toast, "
            "pg_column_toast_chunk_id(embedding_half) AS half_toast, embedding_half IS NOT NULL AS has_half "
            "FROM messages WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids})).all()
    by_content = {r.content: r for r in rows}
    assert by_content["a short message"].content_toast is None
    assert by_content[long].content_toast is not None
    assert all(r.vector_toast is None and r.half_toast is None and r.has_half for r in rows)


async def test_0005_fills_in_and_takes_away_the_half_precision_copies(database_url):
    admin = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    url = make_url(database_url).set(database="halfvec_migration").render_as_string(hide_password=False)
    # a text literal: this engine is a plain one, without the binary codecs `Database` registers
    vector = "[" + ",".join(map(str, np.linspace(-1, 1, DIM) / np.linalg.norm(np.linspace(-1, 1, DIM)))) + "]"
    engine = None
    try:
        async with admin.connect() as conn:
            await conn.execute(text("DROP DATABASE IF EXISTS halfvec_migration"))
            await conn.execute(text("CREATE DATABASE halfvec_migration"))
        await migrate(url, "0004_memory_recall_index")
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            conv = (await conn.execute(text(
                "INSERT INTO conversations (id, user_id) VALUES (gen_random_uuid(), 'u') RETURNING id"))).scalar_one()
            await conn.execute(text(
                "INSERT INTO messages (id, conversation_id, user_id, role, content, token_count, embedding) "
                "VALUES (gen_random_uuid(), :c, 'u', 1, 'before the migration', 3, CAST(:v AS vector)), "
                "(gen_random_uuid(), :c, 'u', 1, 'no vector', 2, NULL)"),
                {"c": conv, "v": vector})
        await migrate(url)
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text(
                "SELECT content, embedding_half = CAST(CAST(:v AS vector) AS halfvec) FROM messages"),
                {"v": vector})).all())
            indexes = set((await conn.execute(text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'"))).scalars())
        assert rows == {"before the migration": True, "no vector": None}
        assert "messages_user_recall_half" in indexes and "messages_user_recall" not in indexes

        await downgrade(url, "0004_memory_recall_index")
        async with engine.connect() as conn:
            columns = set((await conn.execute(text(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'"))).scalars())
            indexes = set((await conn.execute(text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'"))).scalars())
            kept = (await conn.execute(text("SELECT count(*) FROM messages WHERE embedding IS NOT NULL"))).scalar()
        assert "embedding_half" not in columns and kept == 1
        assert "messages_user_recall" in indexes and "messages_user_recall_half" not in indexes
    finally:
        if engine is not None:
            await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text("DROP DATABASE IF EXISTS halfvec_migration WITH (FORCE)"))
        await admin.dispose()


async def test_the_query_vector_is_a_parameter_of_its_own_type_in_a_generic_plan(store):
    """A statement prepared and run often gets a generic plan. There the query vector must be a parameter typed
    vector (halfvec), parsed once per execution, not an expression over a parameter: a float4[] cast to vector was
    computed for every row scanned, 19 ms instead of 3 for 5,000 rows; one parameter cast to both types is typed
    halfvec and cast to vector (a half-precision query for the float4 ranking)."""
    exact, approximate, params = store.recall_statements(_query("any-user", np.full(DIM, 0.05, np.float32), 10))

    def literal(value) -> str:
        if isinstance(value, (Vector, HalfVector)):
            return f"'{value.to_text()}'"
        if isinstance(value, list):
            return "'{" + ",".join(str(v) for v in value) + "}'"
        return f"'{value}'" if isinstance(value, str) else str(value)

    for name, statement in (("exact", exact), ("approximate", approximate)):
        compiled = statement.compile(dialect=postgresql.asyncpg.dialect())
        arguments = ", ".join(literal(params[p]) for p in compiled.positiontup)
        async with store.engine.connect() as conn:
            await conn.execute(text("SET plan_cache_mode = force_generic_plan"))
            await conn.exec_driver_sql(f"PREPARE recall_{name} AS {compiled}")
            plan = "\n".join((await conn.exec_driver_sql(
                f"EXPLAIN (VERBOSE) EXECUTE recall_{name}({arguments})")).scalars())
            await conn.exec_driver_sql(f"DEALLOCATE recall_{name}")
            await conn.rollback()
        distances = re.findall(r"<=> ([^)]*)\)", plan)
        assert distances and all(re.fullmatch(r"\$\d+", d) for d in distances), (name, distances)
