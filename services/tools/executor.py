"""The executor: checks a call, runs the tool within its limits, audits and counts it.

Order of checks (nothing runs before all pass): user id, tool name, call id,
argument size, argument schema. A caller mistake is an `InvalidArgument` /
`NotFound`. Once the tool runs, whatever happens (its own error, a crash, its time
limit) is a `ToolOutcome` the model can read, not an RPC error. Executions share a
process-wide bound (`max_concurrency`); a call that cannot get a slot within
`queue_timeout_s` is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from jsonschema.exceptions import ValidationError

from parley.runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from parley.runtime.interceptors import current_request_id
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics
from parley.runtime.validation import invalid, user_id
from services.tools.audit import AuditLog, AuditRecord
from services.tools.core import TOOL_NAME_RE, CallContext, ToolError
from services.tools.registry import Entry, Registry

_log = get_logger(__name__)

MAX_CALL_ID_CHARS = 128
MAX_VIOLATIONS = 20
_UNEXPECTED = "the tool failed unexpectedly (internal error); the details are in the server log"


@dataclass(frozen=True)
class Limits:
    max_concurrency: int
    queue_timeout_s: float
    max_argument_bytes: int
    max_result_bytes: int


@dataclass(frozen=True)
class ToolOutcome:
    call_id: str
    name: str
    outcome: str  # OK, ERROR, TIMEOUT
    content_json: str
    error: str
    duration_ms: float


class Executor:
    def __init__(self, registry: Registry, audit: AuditLog, metrics: Metrics, limits: Limits) -> None:
        self.registry = registry
        self._audit = audit
        self._limits = limits
        self._slots = asyncio.Semaphore(limits.max_concurrency)
        self._executions = metrics.counter(
            "parley_tool_executions_total", "Tool executions, by tool and outcome.", ["tool", "outcome"]
        )
        self._latency = metrics.histogram(
            "parley_tool_execution_duration_seconds", "Tool execution time, by tool and outcome.", ["tool", "outcome"]
        )

    def lookup(self, name: str) -> Entry:
        if not name:
            raise invalid("name", "is required")
        if not TOOL_NAME_RE.match(name):
            raise invalid("name", "must be 1-64 characters of letters, digits, '_' and '-'")
        entry = self.registry.get(name)
        if entry is None:
            raise NotFound(message=f"tool {name!r} not found; ListTools shows the available tools",
                           metadata={"tool": name})
        return entry

    async def execute(self, name: str, user: str, arguments: dict[str, Any], call_id: str) -> ToolOutcome:
        user_id(user)
        if len(call_id) > MAX_CALL_ID_CHARS or "\x00" in call_id:
            raise invalid("call_id", f"must be at most {MAX_CALL_ID_CHARS} characters without NUL")
        try:
            entry = self.lookup(name)
        except NotFound:
            self._count("_unknown", "REJECTED", 0.0)
            raise
        arguments = normalize_numbers(arguments)
        try:
            self._check_arguments(entry, arguments)
        except InvalidArgument as exc:
            self._count(name, "REJECTED", 0.0)
            await self._audit.record(AuditRecord(
                current_request_id() or "", user, name, call_id, arguments, "REJECTED", exc.message, 0.0
            ))
            raise

        try:
            await asyncio.wait_for(self._slots.acquire(), self._limits.queue_timeout_s)
        except TimeoutError:
            self._count(name, "BUSY", 0.0)
            raise ResourceExhausted(
                message=f"all {self._limits.max_concurrency} tool slots are busy; try again shortly",
                retry_after_s=1.0,
            ) from None
        try:
            return await self._run(entry, CallContext(user, call_id, current_request_id()), arguments)
        finally:
            self._slots.release()

    def _check_arguments(self, entry: Entry, arguments: dict[str, Any]) -> None:
        size = len(json.dumps(arguments, separators=(",", ":"), ensure_ascii=False).encode())
        if size > self._limits.max_argument_bytes:
            raise invalid("arguments", f"are {size} bytes as JSON; the limit is {self._limits.max_argument_bytes}")
        errors = sorted(entry.validator.iter_errors(arguments), key=lambda e: (list(map(str, e.path)), e.message))
        if not errors:
            return
        violations: dict[str, str] = {}
        for err in errors[:MAX_VIOLATIONS]:
            field = ".".join(["arguments", *map(str, err.absolute_path)])
            why = _describe(err)
            violations[field] = f"{violations[field]}; {why}" if field in violations else why
        more = f" (and {len(errors) - MAX_VIOLATIONS} more)" if len(errors) > MAX_VIOLATIONS else ""
        summary = "; ".join(f"{f}: {w}" for f, w in violations.items())
        raise InvalidArgument(
            message=f"arguments do not match the schema of tool {entry.spec.name!r}: {summary}{more}",
            violations=violations,
            metadata={"tool": entry.spec.name},
        )

    async def _run(self, entry: Entry, call: CallContext, arguments: dict[str, Any]) -> ToolOutcome:
        spec = entry.spec
        started = time.perf_counter()
        outcome, error, content = "OK", "", ""
        try:
            async with asyncio.timeout(spec.timeout_s):
                value = await entry.tool.run(arguments, call)
        except TimeoutError:
            outcome, error = "TIMEOUT", f"the tool did not finish within its time limit of {spec.timeout_s:g} s"
        except ToolError as exc:
            outcome, error = "ERROR", exc.message or "the tool failed"
        except asyncio.CancelledError:
            await self._finish(spec.name, call, arguments, "CANCELLED", "the caller cancelled the call", started, 0)
            raise
        except Exception as exc:  # a crash inside the tool is a result for the model, not an RPC error
            _log.error("tool_crashed", tool=spec.name, source=spec.source, exc_info=exc)
            outcome, error = "ERROR", _UNEXPECTED
        else:
            outcome, content, error = self._encode(spec.name, value)
        duration_ms = await self._finish(spec.name, call, arguments, outcome, error, started, len(content))
        return ToolOutcome(call.call_id, spec.name, outcome, content, error, duration_ms)

    def _encode(self, name: str, value: Any) -> tuple[str, str, str]:
        """(outcome, content_json, error) for a tool's return value."""
        try:
            content = json.dumps(value, ensure_ascii=False, default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            _log.error("tool_result_not_json", tool=name, error=str(exc)[:300])
            return "ERROR", "", "the tool returned a value that cannot be encoded as JSON"
        size = len(content.encode())
        if size > self._limits.max_result_bytes:
            return "ERROR", "", f"the tool's result is {size} bytes; the limit is {self._limits.max_result_bytes}"
        return "OK", content, ""

    async def _finish(self, name: str, call: CallContext, arguments: dict[str, Any], outcome: str, error: str,
                      started: float, result_bytes: int) -> float:
        duration_ms = (time.perf_counter() - started) * 1000
        self._count(name, outcome, duration_ms / 1000)
        await self._audit.record(AuditRecord(
            call.request_id or "", call.user_id, name, call.call_id, arguments, outcome, error, duration_ms,
            result_bytes,
        ))
        return duration_ms

    def _count(self, tool: str, outcome: str, seconds: float) -> None:
        self._executions.labels(tool, outcome).inc()
        if outcome not in ("REJECTED", "BUSY"):
            self._latency.labels(tool, outcome).observe(seconds)


def normalize_numbers(value: Any) -> Any:
    """protobuf Struct carries every number as a double: give integral values back their int type."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: normalize_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize_numbers(v) for v in value]
    return value


def _describe(err: ValidationError) -> str:
    message = err.message
    return message if len(message) <= 300 else message[:297] + "..."


def _json_default(value: Any) -> Any:
    """Dates, decimals and other scalars the tools return: their string (or float) form."""
    if isinstance(value, Decimal):
        f = float(value)
        return f if math.isfinite(f) else str(value)
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
