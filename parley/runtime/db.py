"""PostgreSQL access: the async SQLAlchemy engine and Alembic migrations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from alembic import command
from alembic.config import Config
from pgvector.asyncpg import register_vector
from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# A pooled connection idle longer than this is pinged before it is lent (see `_ping_when_idle`).
PING_IDLE_S = 5.0


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection whose statements each stand alone: a read, or a write that is one statement. No BEGIN
    and no COMMIT/ROLLBACK: one round trip per statement."""
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")


class Base(DeclarativeBase):
    """Declarative base of every Parley table."""


def async_url(url: str) -> str:
    """Accept `postgres://`, `postgresql://` or `postgresql+asyncpg://`; return the asyncpg form."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
        scheme = "postgresql+asyncpg"
    if scheme != "postgresql+asyncpg":
        raise ValueError(f"DATABASE_URL must be a PostgreSQL URL, got scheme {parts.scheme!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection before lending it only if it sat idle for `idle_s` or more.

    SQLAlchemy's `pool_pre_ping` pings on every checkout: a full round trip before each statement, ~0.6 ms on a
    small VM and a fifth of an append's cost. A connection returned moments ago is almost surely alive; one that
    idled may have been cut (a database restart, a proxy's idle timeout) and is pinged, and replaced if dead.
    A connection that dies while in steady use fails its statement instead: SQLAlchemy then invalidates the whole
    pool, the failure reaches the caller as UNAVAILABLE (`errors.from_exception`), and the caller's gRPC retry
    policy retries it on a fresh connection.
    """

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection, record) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _lent(dbapi_connection, record, proxy) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < idle_s:
            return  # new, or in steady use
        try:
            dbapi_connection.ping()
        except Exception as exc:  # the pool replaces the connection and retries the checkout
            raise DisconnectionError(f"pooled connection idle {time.monotonic() - returned:.0f} s was dead") from exc


def _vector_codecs(engine: Engine) -> None:
    """pgvector's binary codecs on every new connection (`pgvector.asyncpg.register_vector`): a `vector` or
    `halfvec` parameter is sent as its binary form (a `pgvector.utils.Vector` or `HalfVector`, or a list or array of
    floats) instead of a text literal, which took ~130 us to format per 384-d vector here, and the server to parse;
    vector results come back as numpy arrays (halfvec ones as `HalfVector`)."""

    @event.listens_for(engine, "connect")
    def _connected(dbapi_connection, record) -> None:
        dbapi_connection.run_async(_register_vector)


async def _register_vector(connection) -> None:
    try:
        await register_vector(connection)
    except ValueError as exc:  # a database without the extension (not migrated yet, or one that needs none)
        if not str(exc).startswith("unknown type"):
            raise


# pgvector's HNSW scans (memory recall of large users, document search): 100 candidates per scan, and iterative
# scans, so that a selective filter (one user's rows) does not starve the result list. Sent at connect time for
# every connection's session, instead of SET LOCAL (and the transaction it needs) before each search.
VECTOR_SCAN_SETTINGS = {"hnsw.ef_search": "100", "hnsw.iterative_scan": "relaxed_order"}


class Database:
    """The engines and session factory of one process, built once and disposed on shutdown.

    `engine` serves everything; `derived_engine` (small, opened on first use) writes data that can be recomputed,
    such as embedding vectors: autocommit, with `synchronous_commit=off` for its whole session, so each write is
    one round trip that does not wait for the WAL flush. A crash may lose its last few hundred milliseconds of
    writes, which the embedding backfill recomputes; it never loses or corrupts anything else.
    """

    def __init__(self, url: str, pool_size: int = 20, application_name: str = "parley",
                 ping_idle_s: float = PING_IDLE_S) -> None:
        self.url = async_url(url)
        self._application_name = application_name
        self._ping_idle_s = ping_idle_s
        self.engine: AsyncEngine = self._engine(pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._derived: AsyncEngine | None = None

    def _engine(self, pool_size: int, server_settings: dict[str, str] | None = None, **options) -> AsyncEngine:
        settings = {"application_name": self._application_name, **VECTOR_SCAN_SETTINGS, **(server_settings or {})}
        # LIFO: the connection returned last is lent next, so light traffic keeps to a few warm connections whose
        # statements are prepared already (FIFO would rotate through all of them, each preparing them again).
        engine = create_async_engine(self.url, pool_size=pool_size, max_overflow=pool_size, pool_use_lifo=True,
                                     connect_args={"server_settings": settings}, **options)
        _ping_when_idle(engine.sync_engine, self._ping_idle_s)
        _vector_codecs(engine.sync_engine)
        return engine

    @property
    def derived_engine(self) -> AsyncEngine:
        if self._derived is None:
            self._derived = self._engine(2, isolation_level="AUTOCOMMIT",
                                         server_settings={"synchronous_commit": "off"})
        return self._derived

    async def close(self) -> None:
        await self.engine.dispose()
        if self._derived is not None:
            await self._derived.dispose()


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", async_url(url).replace("%", "%%"))
    return cfg


async def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the schema (Alembic). Safe to run from several processes at once:
    env.py holds a PostgreSQL advisory lock for the duration."""
    await asyncio.to_thread(command.upgrade, _alembic_config(url), revision)


async def downgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(command.downgrade, _alembic_config(url), revision)
