"""Usage rows: one per model call and one per answer-cache hit, in `usage_records`.

The operator dashboard reads these rows; the budget guard rebuilds a user's spend from
them when Redis lost it (`spend_since`). Recording never fails a turn: the answer is
already produced, and failing would make the client retry and pay twice. A lost row is
logged and counted (`parley_chat_usage_record_failures_total`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from parley.runtime.db import autocommit
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics

_log = get_logger(__name__)

UsageKind = Literal["generate", "summary", "cache"]

_INSERT = text(
    """
    INSERT INTO usage_records (user_id, session_id, request_id, model, provider, prompt_tokens,
                               completion_tokens, cost_usd, priced, estimated, latency_ms, cache_hit,
                               tool_called, kind)
    VALUES (:user_id, :session_id, :request_id, :model, :provider, :prompt_tokens, :completion_tokens,
            :cost_usd, :priced, :estimated, :latency_ms, :cache_hit, :tool_called, :kind)
    """
)


class UsageRecorder:
    def __init__(self, engine: AsyncEngine, metrics: Metrics) -> None:
        self.engine = engine
        self._failures = metrics.counter(
            "parley_chat_usage_record_failures_total", "Usage rows that could not be written.", ["kind"]
        )

    async def record(self, **fields) -> bool:
        """Write one row (the fields of `usage_row`). Returns False (after logging) when it could not be written."""
        return await self.record_many([usage_row(**fields)])

    async def record_many(self, rows: list[dict]) -> bool:
        """Write the rows of one turn (from `usage_row`) in order, all or none."""
        if not rows:
            return True
        try:
            if len(rows) == 1:  # the usual turn: one statement is atomic alone, without BEGIN and COMMIT
                async with autocommit(self.engine) as conn:
                    await conn.execute(_INSERT, rows[0])
            else:
                async with self.engine.begin() as conn:
                    await conn.execute(_INSERT, rows)
        except (SQLAlchemyError, OSError) as exc:
            for row in rows:
                self._failures.labels(row["kind"]).inc()
                _log.error("usage_record_failed", user_id=row["user_id"], model=row["model"], kind=row["kind"],
                           cost_usd=row["cost_usd"], error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    async def spend_since(self, user_id: str, since: datetime) -> float:
        """US dollars the user spent since `since` (priced rows only)."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                text("SELECT COALESCE(SUM(cost_usd), 0) FROM usage_records WHERE user_id = :u AND created_at >= :s"),
                {"u": user_id, "s": since},
            )
        return float(value or 0)


def usage_row(
    *,
    user_id: str,
    model: str,
    provider: str = "",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost_usd: float | None = None,
    priced: bool = False,
    estimated: bool = False,
    latency_ms: float = 0.0,
    cache_hit: bool = False,
    tool_called: str | None = None,
    kind: UsageKind = "generate",
    session_id: str = "",
    request_id: str = "",
) -> dict:
    """One usage row; `cost_usd=None` (or `priced=False`) means the model is unpriced."""
    if kind not in ("generate", "summary", "cache"):
        raise ValueError(f"unknown usage kind {kind!r}")
    return dict(
        user_id=user_id, session_id=_uuid_or_none(session_id), request_id=request_id,
        model=model, provider=provider, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        cost_usd=cost_usd if priced else None, priced=priced and cost_usd is not None, estimated=estimated,
        latency_ms=latency_ms, cache_hit=cache_hit, tool_called=tool_called, kind=kind,
    )


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None
