"""The audit trail: one `tools_audit` row and one log line per execution.

Rows carry who ran which tool with which arguments (capped in size), how it ended
and how long it took. A failure to write the row is logged and does not fail the
execution: the log line is the fallback record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from parley.runtime.logging import get_logger

_log = get_logger("parley.tools.audit")

_INSERT = text(
    """
    INSERT INTO tools_audit
        (request_id, user_id, tool, call_id, arguments, arguments_truncated, outcome, error, duration_ms, result_bytes)
    VALUES
        (:request_id, :user_id, :tool, :call_id, CAST(:arguments AS jsonb), :truncated, :outcome, :error,
         :duration_ms, :result_bytes)
    """
)


@dataclass(frozen=True)
class AuditRecord:
    request_id: str
    user_id: str
    tool: str
    call_id: str
    arguments: dict[str, Any]
    outcome: str  # OK, ERROR, TIMEOUT, CANCELLED, REJECTED
    error: str
    duration_ms: float
    result_bytes: int = 0


def capped_arguments(arguments: dict[str, Any], max_chars: int) -> tuple[str, bool]:
    """The arguments as JSON text, replaced by a truncated preview when longer than `max_chars`."""
    # PostgreSQL's jsonb rejects \u0000: NULs in strings are stored as U+FFFD.
    raw = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"), default=str).replace("\\u0000", "\\ufffd")
    if len(raw) <= max_chars:
        return raw, False
    return json.dumps({"_truncated": True, "chars": len(raw), "preview": raw[:max_chars]}), True


class AuditLog:
    def __init__(self, engine: AsyncEngine, max_argument_chars: int) -> None:
        self._engine = engine
        self._max_chars = max_argument_chars

    async def record(self, r: AuditRecord) -> None:
        arguments, truncated = capped_arguments(r.arguments, self._max_chars)
        _log.info(
            "tool_executed",
            user_id=r.user_id, tool=r.tool, call_id=r.call_id, outcome=r.outcome,
            ms=round(r.duration_ms, 2), error=r.error[:300], arguments=arguments[:1000],
        )
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    _INSERT,
                    {
                        "request_id": r.request_id, "user_id": r.user_id, "tool": r.tool[:128],
                        "call_id": r.call_id, "arguments": arguments, "truncated": truncated,
                        "outcome": r.outcome, "error": r.error[:2000].replace("\x00", "\ufffd"),
                        "duration_ms": r.duration_ms, "result_bytes": r.result_bytes,
                    },
                )
        except Exception as exc:  # the audit row must not turn a finished execution into a failure
            _log.error("tool_audit_failed", tool=r.tool, user_id=r.user_id, error=repr(exc)[:300])
