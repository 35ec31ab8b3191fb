"""Read-only queries behind the operator dashboard (no Streamlit here; app.py renders).

All numbers come from PostgreSQL: `usage_records` (one row per model call and one per answer-cache hit, written
by the chat service; migration 0003_chat), `conversations`, `messages` and `documents` (memory service).

Definitions used everywhere:
- a *turn* is one chat request: the usage rows of kinds `generate` and `cache` sharing a `request_id`;
- *model calls* are rows of kind `generate` or `summary` (a cache hit calls no model);
- *cost* is the sum of `cost_usd` over priced rows; rows with `priced = false` are *unpriced* and counted
  separately, never as $0;
- *latency* is per turn, the sum of its model calls' `latency_ms`, over turns not answered from the cache.

The connection is opened read-only (`default_transaction_read_only`) with a statement timeout.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pandas as pd

# Window choices: label -> (length, time bucket of the activity chart). None = all time.
WINDOWS: dict[str, tuple[timedelta | None, str]] = {
    "Last hour": (timedelta(hours=1), "minute"),
    "Last 24 hours": (timedelta(hours=24), "hour"),
    "Last 7 days": (timedelta(days=7), "day"),
    "Last 30 days": (timedelta(days=30), "day"),
    "All time": (None, "day"),
}
DEFAULT_WINDOW = "Last 24 hours"
STATEMENT_TIMEOUT_MS = 10_000

_TURN_KEY = "COALESCE(NULLIF(request_id, ''), 'row-' || id::text)"


def asyncpg_dsn(url: str) -> str:
    """DATABASE_URL in any of Parley's accepted forms (postgres://, postgresql://, postgresql+asyncpg://) as a
    DSN asyncpg accepts."""
    parts = urlsplit(url)
    if not parts.scheme.startswith(("postgres", "postgresql")):
        raise ValueError(f"DATABASE_URL must be a PostgreSQL URL, got scheme {parts.scheme!r}")
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


@dataclass
class Cost:
    """Spend over some rows: priced dollars plus how many model calls had no price."""

    usd: float
    priced_calls: int
    unpriced_calls: int

    def label(self) -> str:
        """'$0.0123', 'unpriced', '$0.0123 + unpriced', or '—' when there were no model calls."""
        if self.priced_calls == 0 and self.unpriced_calls == 0:
            return "—"
        if self.priced_calls == 0:
            return "unpriced"
        dollars = format_usd(self.usd)
        return f"{dollars} + unpriced" if self.unpriced_calls else dollars


def format_usd(value: float) -> str:
    """Dollars with the precision small per-call costs need: $12.30, $0.0420, $0.000315."""
    if value == 0:
        return "$0.00"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    if abs(value) >= 0.01:
        return f"${value:.4f}"
    return f"${value:.6f}".rstrip("0")


@dataclass
class Overview:
    turns: int
    cache_hits: int
    model_calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: Cost
    users: int
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    estimated_calls: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cache_hit_rate(self) -> float | None:
        return self.cache_hits / self.turns if self.turns else None


@dataclass
class StorageCounts:
    conversations: int | None
    messages: int | None
    documents: int | None
    users_with_conversations: int | None


@dataclass
class Snapshot:
    """Everything the dashboard shows for one window, read in one connection."""

    window: str
    since: datetime | None
    read_at: datetime
    usage_table: bool  # False when migration 0003_chat has not run yet
    overview: Overview | None = None
    activity: pd.DataFrame = field(default_factory=pd.DataFrame)
    by_model: pd.DataFrame = field(default_factory=pd.DataFrame)
    by_user: pd.DataFrame = field(default_factory=pd.DataFrame)
    recent: pd.DataFrame = field(default_factory=pd.DataFrame)
    storage: StorageCounts | None = None


def _num(value) -> float:
    if value is None:
        return 0.0
    return float(value) if not isinstance(value, Decimal) else float(value)


def _opt(value) -> float | None:
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


async def _exists(conn: asyncpg.Connection, table: str) -> bool:
    return await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)


async def overview(conn: asyncpg.Connection, since: datetime | None) -> Overview:
    row = await conn.fetchrow(
        f"""
        WITH r AS (
            SELECT * FROM usage_records WHERE $1::timestamptz IS NULL OR created_at >= $1
        ), turns AS (
            SELECT {_TURN_KEY} AS turn, bool_or(kind = 'cache') AS cached, sum(latency_ms) AS latency_ms
            FROM r WHERE kind IN ('generate', 'cache') GROUP BY 1
        )
        SELECT
            (SELECT count(*) FROM turns) AS turns,
            (SELECT count(*) FROM turns WHERE cached) AS cache_hits,
            (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FROM turns WHERE NOT cached) AS p50,
            (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FROM turns WHERE NOT cached) AS p95,
            count(*) FILTER (WHERE kind <> 'cache') AS model_calls,
            COALESCE(sum(prompt_tokens), 0) AS prompt_tokens,
            COALESCE(sum(completion_tokens), 0) AS completion_tokens,
            COALESCE(sum(cost_usd) FILTER (WHERE priced), 0) AS cost_usd,
            count(*) FILTER (WHERE priced AND kind <> 'cache') AS priced_calls,
            count(*) FILTER (WHERE NOT priced AND kind <> 'cache') AS unpriced_calls,
            count(*) FILTER (WHERE estimated AND kind <> 'cache') AS estimated_calls,
            count(DISTINCT user_id) AS users
        FROM r
        """,
        since,
    )
    return Overview(
        turns=row["turns"], cache_hits=row["cache_hits"], model_calls=row["model_calls"],
        prompt_tokens=int(row["prompt_tokens"]), completion_tokens=int(row["completion_tokens"]),
        cost=Cost(_num(row["cost_usd"]), row["priced_calls"], row["unpriced_calls"]),
        users=row["users"], p50_latency_ms=_opt(row["p50"]), p95_latency_ms=_opt(row["p95"]),
        estimated_calls=row["estimated_calls"],
    )


async def activity(conn: asyncpg.Connection, since: datetime | None, bucket: str) -> pd.DataFrame:
    """Turns and tokens per time bucket (minute/hour/day), for the chart."""
    if bucket not in ("minute", "hour", "day"):
        raise ValueError(bucket)
    rows = await conn.fetch(
        f"""
        SELECT date_trunc('{bucket}', created_at AT TIME ZONE 'UTC') AS bucket,
               count(DISTINCT {_TURN_KEY}) FILTER (WHERE kind IN ('generate', 'cache')) AS turns,
               COALESCE(sum(prompt_tokens + completion_tokens), 0) AS tokens
        FROM usage_records WHERE $1::timestamptz IS NULL OR created_at >= $1
        GROUP BY 1 ORDER BY 1
        """,
        since,
    )
    return pd.DataFrame([dict(r) for r in rows], columns=["bucket", "turns", "tokens"])


async def by_model(conn: asyncpg.Connection, since: datetime | None) -> pd.DataFrame:
    rows = await conn.fetch(
        """
        SELECT model, provider,
               count(*) FILTER (WHERE kind <> 'cache') AS calls,
               count(*) FILTER (WHERE kind = 'cache') AS cache_hits,
               COALESCE(sum(prompt_tokens), 0) AS prompt_tokens,
               COALESCE(sum(completion_tokens), 0) AS completion_tokens,
               COALESCE(sum(cost_usd) FILTER (WHERE priced), 0) AS cost_usd,
               count(*) FILTER (WHERE priced AND kind <> 'cache') AS priced_calls,
               count(*) FILTER (WHERE NOT priced AND kind <> 'cache') AS unpriced_calls,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE kind <> 'cache') AS p50_ms,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE kind <> 'cache') AS p95_ms
        FROM usage_records WHERE $1::timestamptz IS NULL OR created_at >= $1
        GROUP BY model, provider
        ORDER BY calls DESC, model, provider
        """,
        since,
    )
    out = []
    for r in rows:
        cost = Cost(_num(r["cost_usd"]), r["priced_calls"], r["unpriced_calls"])
        out.append({
            "model": r["model"], "provider": r["provider"], "calls": r["calls"], "cache_hits": r["cache_hits"],
            "prompt_tokens": int(r["prompt_tokens"]), "completion_tokens": int(r["completion_tokens"]),
            "cost": cost.label(), "unpriced_calls": r["unpriced_calls"],
            "p50_ms": _opt(r["p50_ms"]), "p95_ms": _opt(r["p95_ms"]),
        })
    return pd.DataFrame(out, columns=["model", "provider", "calls", "cache_hits", "prompt_tokens",
                                      "completion_tokens", "cost", "unpriced_calls", "p50_ms", "p95_ms"])


async def by_user(conn: asyncpg.Connection, since: datetime | None, limit: int = 20) -> pd.DataFrame:
    """Top users by priced cost, then by tokens."""
    rows = await conn.fetch(
        f"""
        SELECT user_id,
               count(DISTINCT {_TURN_KEY}) FILTER (WHERE kind IN ('generate', 'cache')) AS turns,
               COALESCE(sum(prompt_tokens + completion_tokens), 0) AS tokens,
               COALESCE(sum(cost_usd) FILTER (WHERE priced), 0) AS cost_usd,
               count(*) FILTER (WHERE priced AND kind <> 'cache') AS priced_calls,
               count(*) FILTER (WHERE NOT priced AND kind <> 'cache') AS unpriced_calls,
               max(created_at) AS last_seen
        FROM usage_records WHERE $1::timestamptz IS NULL OR created_at >= $1
        GROUP BY user_id
        ORDER BY cost_usd DESC, tokens DESC, user_id
        LIMIT $2
        """,
        since, limit,
    )
    out = [{
        "user_id": r["user_id"], "turns": r["turns"], "tokens": int(r["tokens"]),
        "cost": Cost(_num(r["cost_usd"]), r["priced_calls"], r["unpriced_calls"]).label(),
        "unpriced_calls": r["unpriced_calls"], "last_seen": r["last_seen"],
    } for r in rows]
    return pd.DataFrame(out, columns=["user_id", "turns", "tokens", "cost", "unpriced_calls", "last_seen"])


async def recent(conn: asyncpg.Connection, limit: int = 50) -> pd.DataFrame:
    """The latest usage rows, newest first (not limited to the window)."""
    rows = await conn.fetch(
        """
        SELECT created_at, user_id, session_id::text AS session_id, request_id, kind, model, provider,
               prompt_tokens, completion_tokens, cost_usd, priced, estimated, latency_ms, cache_hit, tool_called
        FROM usage_records ORDER BY created_at DESC, id DESC LIMIT $1
        """,
        limit,
    )
    out = []
    for r in rows:
        if r["kind"] == "cache":
            cost = "cache hit"
        elif r["priced"] and r["cost_usd"] is not None:
            cost = format_usd(_num(r["cost_usd"]))
        else:
            cost = "unpriced"
        out.append({
            "time": r["created_at"], "user_id": r["user_id"], "model": r["model"], "provider": r["provider"],
            "kind": r["kind"], "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "cost": cost, "latency_ms": round(r["latency_ms"], 1), "tool": r["tool_called"] or "",
            "request_id": r["request_id"], "session_id": r["session_id"] or "", "estimated": r["estimated"],
        })
    return pd.DataFrame(out, columns=["time", "user_id", "model", "provider", "kind", "prompt_tokens",
                                      "completion_tokens", "cost", "latency_ms", "tool", "request_id",
                                      "session_id", "estimated"])


async def storage_counts(conn: asyncpg.Connection) -> StorageCounts:
    async def count(table: str, expr: str = "count(*)") -> int | None:
        if not await _exists(conn, table):
            return None
        return await conn.fetchval(f"SELECT {expr} FROM {table}")  # table names are constants

    return StorageCounts(
        conversations=await count("conversations"),
        messages=await count("messages"),
        documents=await count("documents"),
        users_with_conversations=await count("conversations", "count(DISTINCT user_id)"),
    )


async def load_async(database_url: str, window: str = DEFAULT_WINDOW, *, top_users: int = 20,
                     recent_rows: int = 50, now: datetime | None = None) -> Snapshot:
    length, bucket = WINDOWS[window]
    now = now or datetime.now(UTC)
    since = now - length if length else None
    conn = await asyncpg.connect(
        asyncpg_dsn(database_url),
        timeout=10,
        server_settings={
            "default_transaction_read_only": "on",
            "statement_timeout": str(STATEMENT_TIMEOUT_MS),
            "application_name": "parley-dashboard",
        },
    )
    try:
        snap = Snapshot(window, since, now, usage_table=await _exists(conn, "usage_records"))
        if snap.usage_table:
            snap.overview = await overview(conn, since)
            snap.activity = await activity(conn, since, bucket)
            snap.by_model = await by_model(conn, since)
            snap.by_user = await by_user(conn, since, top_users)
            snap.recent = await recent(conn, recent_rows)
        snap.storage = await storage_counts(conn)
        return snap
    finally:
        await conn.close()


def load(database_url: str, window: str = DEFAULT_WINDOW, **kwargs) -> Snapshot:
    """Synchronous entry point for Streamlit: the reads run on a private event loop in a worker thread, so it
    works whether or not the calling thread already runs a loop."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashboard-db") as pool:
        return pool.submit(asyncio.run, load_async(database_url, window, **kwargs)).result()
