"""Composition: build shared resources once, start services, tear everything down.

`running(settings, services)` is the one async context manager that `parley up`,
`parley serve <service>` and the tests use. It
1. starts the embedded PostgreSQL / Redis when asked and no URL is configured,
2. runs the Alembic migrations,
3. builds each service (its own async context manager over the shared resources),
4. serves them on one gRPC server (with health, reflection, metrics), and on exit
   drains in-flight RPCs, stops the services and releases every resource.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from parley.runtime.clients import Client
from parley.runtime.config import SERVICE_NAMES, Settings
from parley.runtime.db import Database, migrate
from parley.runtime.embedded import embedded_postgres, embedded_redis
from parley.runtime.embeddings import Embedder
from parley.runtime.errors import FailedPrecondition
from parley.runtime.inprocess import LocalChannel
from parley.runtime.interceptors import INTERNAL_TOKEN_KEY
from parley.runtime.network import is_loopback
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics
from parley.runtime.server import GrpcServer, ServiceBinding

_log = get_logger("parley.app")

# Each service module exposes `build(ctx: ServiceContext) -> AsyncContextManager[ServiceBinding]`.
SERVICE_MODULES = {name: f"services.{name}.app" for name in SERVICE_NAMES}
NEEDS_DATABASE = {"memory", "tools", "chat"}
INTERNAL_SERVICES = {"memory", "inference", "tools"}


@dataclass
class ServiceContext:
    """What a service is built from: settings, metrics and the process's shared resources."""

    settings: Settings
    metrics: Metrics
    database_url: str | None
    redis_url: str | None
    peer_addresses: dict[str, str]
    _stack: AsyncExitStack
    # co-hosted peers are called in process through this channel (None: over gRPC, like any other peer)
    local_peers: frozenset[str] = frozenset()
    local_channel: Callable[[], LocalChannel] | None = None
    _database: Database | None = None
    _redis: aioredis.Redis | None = None
    _clients: dict[str, Client] = field(default_factory=dict)
    _embedder: Embedder | None = None
    _embedder_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def embedder(self) -> Embedder:
        """The process's one sentence-embedding model (loaded on first use, shared by co-hosted services)."""
        async with self._embedder_lock:
            if self._embedder is None:
                cfg = self.settings.embedding
                self._embedder = await Embedder.load(cfg.model_path, cfg.batch_size, cfg.max_wait_ms,
                                                     cfg.threads, cfg.backend, cfg.onnx_cache_dir,
                                                     cfg.precision, cfg.background_wait_ms,
                                                     cfg.background_batch)
                self._embedder.start()
                self._stack.push_async_callback(self._embedder.close)
        return self._embedder

    @property
    def database(self) -> Database:
        """The process's one database engine (created on first use)."""
        if self._database is None:
            if not self.database_url:
                raise RuntimeError("DATABASE_URL is not set and no embedded PostgreSQL was started")
            self._database = Database(self.database_url, self.settings.db_pool_size)
            self._stack.push_async_callback(self._database.close)
        return self._database

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            if not self.redis_url:
                raise RuntimeError("REDIS_URL is not set and no embedded Redis was started")
            self._redis = aioredis.from_url(self.redis_url, decode_responses=False)
            self._stack.push_async_callback(self._redis.aclose)
        return self._redis

    def client(self, peer: str, stub_cls: type, timeout_s: float | None = None) -> Client:
        """A client of another Parley service (one channel per peer per process)."""
        key = f"{peer}:{stub_cls.__name__}"
        if key not in self._clients:
            token = self.settings.internal_token
            metadata = ((INTERNAL_TOKEN_KEY, token.get_secret_value()),) if token else ()
            channel = self.local_channel() if self.local_channel and peer in self.local_peers else None
            c = Client(peer, self.peer_addresses[peer], stub_cls, timeout_s or self.settings.rpc_timeout_s, metadata,
                       channel)
            self._clients[key] = c
            self._stack.push_async_callback(c.close)
        return self._clients[key]


@dataclass
class RunningApp:
    address: str
    port: int
    services: tuple[str, ...]
    database_url: str | None
    redis_url: str | None
    server: GrpcServer
    metrics: Metrics  # the process's registry (what /metrics serves)


@asynccontextmanager
async def migrated_database(settings: Settings) -> AsyncIterator[Database]:
    """For one-off commands: DATABASE_URL, or the embedded PostgreSQL of the data directory, migrated."""
    async with AsyncExitStack() as stack:
        url = settings.database_url or await stack.enter_async_context(
            embedded_postgres(settings.data_dir / "postgres")
        )
        await migrate(url)
        database = Database(url, pool_size=1)
        stack.push_async_callback(database.close)
        yield database


@contextmanager
def frozen_startup_heap() -> Iterator[int]:
    """Exempt what startup built (modules, models, engines: ~790k objects with every service in one process)
    from the cyclic garbage collector's full collections, for as long as the app runs.

    A full collection walks every tracked object while the event loop, and so every service of the process,
    waits: ~290 ms over the startup heap here. With it frozen (`gc.freeze`), full collections walk only what
    was allocated since. Reference counting still frees frozen objects; on exit they are unfrozen, so an app
    started and stopped in a longer-lived process (the tests) leaves nothing exempt behind.
    """
    started = time.perf_counter()
    gc.collect()  # garbage of the startup is freed, not frozen
    gc.freeze()
    frozen = gc.get_freeze_count()
    _log.info("startup_heap_frozen", objects=frozen, collect_ms=round((time.perf_counter() - started) * 1000, 1))
    try:
        yield frozen
    finally:
        gc.unfreeze()


def _builder(service: str) -> Callable[[ServiceContext], AbstractAsyncContextManager[ServiceBinding]]:
    return importlib.import_module(SERVICE_MODULES[service]).build


@asynccontextmanager
async def running(
    settings: Settings,
    services: Sequence[str],
    *,
    port: int,
    embedded: bool,
    serve_metrics: bool = True,
) -> AsyncIterator[RunningApp]:
    unknown = set(services) - set(SERVICE_NAMES)
    if unknown:
        raise ValueError(f"unknown service(s): {', '.join(sorted(unknown))}; choose from {', '.join(SERVICE_NAMES)}")
    async with AsyncExitStack() as stack:
        database_url, redis_url = settings.database_url, settings.redis_url
        if embedded and not database_url and NEEDS_DATABASE & set(services):
            database_url = await stack.enter_async_context(embedded_postgres(settings.data_dir / "postgres"))
        if embedded and not redis_url and "chat" in services:
            redis_url = await stack.enter_async_context(embedded_redis(settings.data_dir / "redis"))
        if NEEDS_DATABASE & set(services):
            if not database_url:
                raise RuntimeError("DATABASE_URL is not set (use `parley up` for the embedded PostgreSQL)")
            await migrate(database_url)

        token = settings.internal_token.get_secret_value() if settings.internal_token else None
        if not is_loopback(settings.host) and INTERNAL_SERVICES & set(services) and not token:
            raise FailedPrecondition(
                message=f"refusing to serve {', '.join(sorted(INTERNAL_SERVICES & set(services)))} on "
                f"{settings.host!r} without PARLEY_INTERNAL_TOKEN: set it (the same on every service), "
                "or PARLEY_HOST=127.0.0.1",
                reason="INSECURE_BIND",
            )
        metrics = Metrics()
        if serve_metrics and settings.metrics_port:
            started = metrics.serve(settings.host, settings.metrics_port)
            if started is not None:
                http_server, _thread = started
                stack.callback(http_server.shutdown)
                _log.info("metrics", address=f"http://{settings.host}:{settings.metrics_port}/metrics")

        server = GrpcServer(settings.host, port, metrics, settings.shutdown_grace_s, token)
        peers = {name: settings.addr_of(name) for name in SERVICE_NAMES}
        peers.update({name: server.address for name in services})  # co-hosted peers: same server
        ctx = ServiceContext(settings, metrics, database_url, redis_url, peers, stack, frozenset(services),
                             server.local_channel if settings.inprocess_calls else None)
        for name in services:
            server.add(await stack.enter_async_context(_builder(name)(ctx)))
        await server.start()
        stack.push_async_callback(server.stop)  # runs first on exit: drain RPCs before tearing down
        stack.enter_context(frozen_startup_heap())
        yield RunningApp(server.address, server.port, tuple(services), database_url, redis_url, server, metrics)
