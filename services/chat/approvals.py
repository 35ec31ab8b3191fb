"""Paused turns waiting for the user's approval of side-effecting tool calls (PostgreSQL)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass
class PausedTurn:
    session_id: str
    state_json: str


class ApprovalStore:
    def __init__(self, engine: AsyncEngine, ttl_s: int) -> None:
        self._engine, self._ttl_s = engine, ttl_s

    async def save(self, approval_id: str, user_id: str, session_id: str, state_json: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO pending_approvals (id, user_id, session_id, expires_at, state, payload) "
                    "VALUES (:id, :user_id, :session_id, now() + make_interval(secs => :ttl), 'pending', "
                    "CAST(:payload AS jsonb))"
                ),
                {"id": uuid.UUID(approval_id), "user_id": user_id, "session_id": uuid.UUID(session_id),
                 "ttl": self._ttl_s, "payload": state_json},
            )

    async def take(self, user_id: str, approval_id: uuid.UUID) -> PausedTurn | None:
        """Claim a pending approval exactly once; None if unknown, another user's, expired or resolved."""
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "UPDATE pending_approvals SET state = 'resolved' "
                        "WHERE id = :id AND user_id = :user_id AND state = 'pending' AND expires_at > now() "
                        "RETURNING session_id, payload::text AS payload"
                    ),
                    {"id": approval_id, "user_id": user_id},
                )
            ).one_or_none()
        return None if row is None else PausedTurn(str(row.session_id), row.payload)
