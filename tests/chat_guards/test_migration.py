"""0003_chat upgrades and downgrades cleanly (in a database of its own)."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from parley.runtime.db import downgrade, migrate
from services.chat.approvals import ApprovalStore

TABLES = {"api_keys", "usage_records", "pending_approvals"}


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            return {r[0] for r in rows}
    finally:
        await engine.dispose()


async def test_0003_upgrade_downgrade(database_url):
    admin = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    url = make_url(database_url).set(database="guards_migration").render_as_string(hide_password=False)
    try:
        async with admin.connect() as conn:
            await conn.execute(text("DROP DATABASE IF EXISTS guards_migration"))
            await conn.execute(text("CREATE DATABASE guards_migration"))
        await migrate(url)
        assert TABLES <= await _tables(url)
        await downgrade(url, "0002_tools_sales")
        assert not TABLES & await _tables(url)
        await migrate(url)
        assert TABLES <= await _tables(url)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text("DROP DATABASE IF EXISTS guards_migration WITH (FORCE)"))
        await admin.dispose()


async def test_pending_approvals_fit_the_approval_store(engine):
    """The chat service's ApprovalStore (services/chat/approvals.py) runs against this schema."""
    store, approval, session = ApprovalStore(engine, ttl_s=60), str(uuid.uuid4()), str(uuid.uuid4())
    await store.save(approval, "alice", session, '{"step": 1}')
    assert await store.take("bob", uuid.UUID(approval)) is None
    taken = await store.take("alice", uuid.UUID(approval))
    assert (taken.session_id, taken.state_json) == (session, '{"step": 1}')
    assert await store.take("alice", uuid.UUID(approval)) is None
