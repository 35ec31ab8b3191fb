"""Shared fixtures: one real embedded PostgreSQL (pgvector) and one real Redis per test
session, settings pointing at them, and `start_stack` to run real gRPC servers on port 0.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from parley.runtime.app import RunningApp, running  # noqa: E402
from parley.runtime.config import Settings  # noqa: E402
from parley.runtime.embedded import embedded_postgres, embedded_redis  # noqa: E402
from parley.runtime.logging import configure_logging  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parley-data")


@pytest.fixture(scope="session")
async def database_url(data_dir: Path) -> AsyncIterator[str]:
    """A real PostgreSQL 18 with pgvector, for the whole test session."""
    configure_logging("WARNING", json=False)
    async with embedded_postgres(data_dir / "postgres") as url:
        yield url


@pytest.fixture(scope="session")
async def redis_url(data_dir: Path) -> AsyncIterator[str]:
    """A real Redis server, for the whole test session."""
    async with embedded_redis(data_dir / "redis") as url:
        yield url


@pytest.fixture(scope="session")
def make_settings(data_dir: Path, database_url: str, redis_url: str) -> Callable[..., Settings]:
    """Settings against the session's PostgreSQL and Redis; keyword overrides win."""

    def make(**overrides) -> Settings:
        base = dict(
            database_url=database_url,
            redis_url=redis_url,
            data_dir=data_dir,
            metrics_port=0,
            log_json=False,
            log_level="WARNING",
            shutdown_grace_s=0.5,
            # The guards give up on Redis after 0.25 s in production (fail fast, fail open). A loaded 2-core CI
            # box can stall that long; tests about timeouts set their own value.
            chat={"guard_redis_timeout_s": 2.0},
        )
        for key, value in overrides.items():  # nested sections merge, so a test overrides only what it names
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) \
                else value
        return Settings(_env_file=None, **base)

    return make


@pytest.fixture(scope="session")
def start_stack(make_settings) -> Callable[..., AbstractAsyncContextManager[RunningApp]]:
    """`async with start_stack(["memory"]) as app:` runs real servers on a free port."""

    @asynccontextmanager
    async def start(services, settings: Settings | None = None, **overrides) -> AsyncIterator[RunningApp]:
        async with running(settings or make_settings(**overrides), services, port=0, embedded=False) as app:
            yield app

    return start


async def eventually(predicate, timeout_s: float = 5.0) -> None:
    """Wait until `predicate()` holds (e.g. a metric that gRPC records once the answer has gone out)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
