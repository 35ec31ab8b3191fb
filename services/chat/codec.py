"""TurnResult <-> bytes, for the idempotency store and the answer cache (JSON, no protobuf in the domain)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime

from services.chat.events import MemoryItem, PendingApproval, ToolCallRecord, TurnResult, Usage


def encode(result: TurnResult) -> bytes:
    def default(value):
        if isinstance(value, datetime):
            return value.isoformat()
        raise TypeError(f"cannot encode {type(value).__name__}")

    return json.dumps(asdict(result), default=default, separators=(",", ":")).encode()


def decode(raw: bytes) -> TurnResult:
    d = json.loads(raw)
    memory = [MemoryItem(**{**m, "created_at": datetime.fromisoformat(m["created_at"]) if m["created_at"] else None})
              for m in d.pop("memory")]
    return TurnResult(
        **{k: v for k, v in d.items() if k not in ("tool_calls", "usage", "pending_approvals")},
        memory=memory,
        tool_calls=[ToolCallRecord(**t) for t in d["tool_calls"]],
        usage=Usage(**d["usage"]),
        pending_approvals=[PendingApproval(**p) for p in d["pending_approvals"]],
    )
