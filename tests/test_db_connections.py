"""Pooled PostgreSQL connections: an idle one is pinged before use, a dead one in steady use fails once as
UNAVAILABLE (which Parley's clients retry), and the pool recovers at once; derived writes skip the WAL wait."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from parley.memory.v1 import memory_pb2 as pb
from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.clients import make_channel
from parley.runtime.db import VECTOR_SCAN_SETTINGS, Database, migrate
from parley.runtime.errors import Unavailable, from_exception


async def _terminate(url: str, application_name: str, since=None) -> int:
    """Kill the server side of matching connections, as a database restart or a proxy timeout would."""
    admin = Database(url, pool_size=1, application_name="parley-test-admin")
    try:
        async with admin.engine.connect() as conn:
            killed = (await conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :name AND (CAST(:since AS timestamptz) IS NULL OR backend_start >= :since)"
            ), {"name": application_name, "since": since})).scalar_one()
    finally:
        await admin.close()
    await asyncio.sleep(0.05)  # the backends exit
    return killed


async def _one(db: Database) -> int:
    async with db.engine.connect() as conn:
        return (await conn.execute(text("SELECT 1"))).scalar_one()


async def test_an_idle_connection_is_pinged_and_replaced_when_dead(database_url):
    name = f"parley-test-{uuid.uuid4().hex[:8]}"
    db = Database(database_url, pool_size=2, application_name=name, ping_idle_s=0.05)
    try:
        assert await _one(db) == 1
        assert await _terminate(database_url, name) == 1
        await asyncio.sleep(0.1)  # idle past the threshold
        assert await _one(db) == 1, "the ping found it dead; the pool lent a fresh one"
    finally:
        await db.close()


async def test_sequential_statements_reuse_the_connection_returned_last(database_url):
    """The pool lends the connection returned last (LIFO): statements one after another keep to one warm
    connection, with its prepared statements, instead of visiting every pooled connection in turn, each of which
    would prepare them again."""
    db = Database(database_url, pool_size=4, application_name=f"parley-test-{uuid.uuid4().hex[:8]}")

    async def backend(hold_s: float = 0.0) -> int:
        async with db.engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await asyncio.sleep(hold_s)
            return pid

    try:
        assert len(set(await asyncio.gather(*(backend(0.05) for _ in range(4))))) == 4, "four pooled connections"
        assert len({await backend() for _ in range(8)}) == 1
    finally:
        await db.close()


async def test_a_connection_lost_in_steady_use_fails_once_as_unavailable(database_url):
    name = f"parley-test-{uuid.uuid4().hex[:8]}"
    db = Database(database_url, pool_size=2, application_name=name, ping_idle_s=3600)  # never pinged
    try:
        assert await _one(db) == 1
        assert await _terminate(database_url, name) == 1
        with pytest.raises(DBAPIError) as lost:
            await _one(db)
        mapped = from_exception(lost.value)
        assert isinstance(mapped, Unavailable) and mapped.code == grpc.StatusCode.UNAVAILABLE
        assert mapped.reason == "DATABASE_UNAVAILABLE"
        assert await _one(db) == 1, "the pool was invalidated: the next statement gets a fresh connection"
    finally:
        await db.close()


async def test_other_failures_are_not_called_unavailable():
    assert from_exception(ValueError("a bug")) is None
    assert from_exception(FileNotFoundError("model.onnx")) is None  # an OSError, but not a connection
    assert isinstance(from_exception(ConnectionRefusedError()), Unavailable)


async def test_derived_writes_skip_the_wal_wait_and_everything_else_does_not(database_url):
    db = Database(database_url, pool_size=1)
    try:
        async with db.engine.connect() as conn:
            main = (await conn.execute(text("SHOW synchronous_commit"))).scalar_one()
            app = (await conn.execute(text("SHOW application_name"))).scalar_one()
        async with db.derived_engine.connect() as conn:
            derived = (await conn.execute(text("SHOW synchronous_commit"))).scalar_one()
            first = (await conn.execute(text("SELECT now()"))).scalar_one()  # now(): when the transaction began
            await asyncio.sleep(0.01)
            second = (await conn.execute(text("SELECT now()"))).scalar_one()
    finally:
        await db.close()
    assert (main, derived, app) == ("on", "off", "parley")
    assert second > first, "autocommit: each statement is its own transaction (no BEGIN/COMMIT round trips)"


async def test_the_service_survives_a_database_restart(start_stack, database_url):
    """The memory service's pooled connections die under it: a caller without retries sees one clear
    UNAVAILABLE; Parley's own channel (gRPC retry policy) never notices."""
    admin = Database(database_url, pool_size=1, application_name="parley-test-admin")
    async with admin.engine.connect() as conn:
        started = (await conn.execute(text("SELECT now()"))).scalar_one()
    await admin.close()
    async with start_stack(["memory"]) as app:
        request = pb.ListConversationsRequest(user_id="restart-user", page_size=5)
        async with grpc.aio.insecure_channel(app.address) as plain:  # no retry policy
            stub = memory_pb2_grpc.MemoryServiceStub(plain)
            await stub.ListConversations(request)
            assert await _terminate(database_url, "parley", since=started) >= 1
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ListConversations(request)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "database connection was lost" in failed.value.details()
            status = rpc_status.from_call(failed.value)
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info) and info.reason == "DATABASE_UNAVAILABLE"
            trailers = dict(failed.value.trailing_metadata())
            assert "grpc-retry-pushback-ms" not in trailers, "a retry is welcome"
            assert trailers["x-request-id"]
            await stub.ListConversations(request)  # recovered at once
        channel = make_channel(app.address)
        try:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            await stub.ListConversations(request)
            assert await _terminate(database_url, "parley", since=started) >= 1
            await stub.ListConversations(request)  # retried by the channel: the caller sees success
        finally:
            await channel.close()


async def test_every_session_scans_hnsw_with_parleys_settings(database_url):
    """Set at connect time (no SET LOCAL, hence no transaction, before each search), on both engines."""
    await migrate(database_url)  # the vector extension
    db = Database(database_url, pool_size=1)
    try:
        seen = []
        for engine in (db.engine, db.derived_engine):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT CAST('[1,2,3]' AS vector)"))  # pgvector's library now loaded
                seen.append(tuple([(await conn.execute(text(f"SHOW {name}"))).scalar_one()
                                   for name in VECTOR_SCAN_SETTINGS]))
    finally:
        await db.close()
    assert seen == [tuple(VECTOR_SCAN_SETTINGS.values())] * 2 == [("100", "relaxed_order")] * 2


async def test_vectors_travel_in_pgvectors_binary_form_and_a_database_without_the_extension_still_connects(
        database_url):
    """`Database` registers pgvector's binary codecs on each connection: a vector or halfvec parameter is sent as
    binary (no text literal to format), and vector results come back as numpy arrays. A database without the
    extension (another service's own database) connects as before."""
    from pgvector.utils import HalfVector, Vector
    from sqlalchemy.engine import make_url

    await migrate(database_url)
    db = Database(database_url, pool_size=1)
    vector = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    try:
        async with db.engine.connect() as conn:
            row = (await conn.execute(text("SELECT CAST(:v AS vector) AS v, CAST(:h AS halfvec) AS h"),
                                      {"v": Vector(vector), "h": HalfVector(vector)})).one()
        assert isinstance(row.v, np.ndarray) and np.array_equal(row.v, vector)  # float4, bit for bit
        assert np.allclose(row.h.to_numpy(), vector, atol=1e-2)
        async with db.engine.connect() as conn:  # the codec is binary: the server's own text form agrees
            text_form = (await conn.execute(text("SELECT CAST(CAST(:v AS vector) AS text)"),
                                            {"v": Vector(vector)})).scalar_one()
        assert np.array_equal(np.array(text_form[1:-1].split(","), dtype=np.float32), vector)
    finally:
        await db.close()

    admin = Database(database_url, pool_size=1, application_name="parley-test-admin")
    url = make_url(database_url).set(database="no_vector_extension").render_as_string(hide_password=False)
    try:
        async with admin.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("DROP DATABASE IF EXISTS no_vector_extension"))
            await conn.execute(text("CREATE DATABASE no_vector_extension"))
        plain = Database(url, pool_size=1)
        try:
            assert await _one(plain) == 1
        finally:
            await plain.close()
    finally:
        async with admin.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("DROP DATABASE IF EXISTS no_vector_extension WITH (FORCE)"))
        await admin.close()
