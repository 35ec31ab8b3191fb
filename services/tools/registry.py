"""The registry: which tools exist, their compiled argument validators, and paging.

A tool is registered only if its name is valid and enabled by configuration, its
schema is a valid JSON schema of an object, and no tool of that name exists yet
(the first one wins; built-ins are registered first). MCP tools come and go with
their server's connection (`replace_source`).
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from jsonschema import Draft202012Validator, SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from parley.runtime.logging import get_logger
from services.tools.core import TOOL_NAME_RE, Tool, ToolSpec

_log = get_logger(__name__)


@dataclass(frozen=True)
class Entry:
    """A registered tool: its effective spec (source and time limit applied) and validator."""

    spec: ToolSpec
    tool: Tool
    validator: Validator


def compile_schema(schema: Mapping[str, Any]) -> Validator:
    """A validator for an argument schema; `SchemaError`/`ValueError` if it is not a usable object schema.

    The dialect is the schema's `$schema` (default: 2020-12); formats such as `date` are checked.
    Remote `$ref`s are never fetched.
    """
    if not isinstance(schema, Mapping):
        raise ValueError("the argument schema must be a JSON object")
    if schema.get("type") != "object":
        raise ValueError("the argument schema must have \"type\": \"object\" at the root")
    cls = validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


class Registry:
    def __init__(self, enabled: list[str], disabled: list[str], timeouts: Mapping[str, float] | None = None) -> None:
        self._enabled = enabled
        self._disabled = disabled
        self._timeouts = dict(timeouts or {})
        self._entries: dict[str, Entry] = {}
        self._names: list[str] = []  # sorted, for keyset paging

    def is_enabled(self, name: str) -> bool:
        return matches(name, self._enabled) and not matches(name, self._disabled)

    def add(self, tool: Tool, source: str | None = None) -> bool:
        """Register a tool; False (and a log line saying why) when it is skipped."""
        spec = tool.spec
        if source is not None:
            spec = replace(spec, source=source)
        if spec.name in self._timeouts:
            spec = replace(spec, timeout_s=self._timeouts[spec.name])
        if not TOOL_NAME_RE.match(spec.name or ""):
            _log.error("tool_skipped", tool=spec.name, source=spec.source, why="invalid name ([A-Za-z0-9_-]{1,64})")
            return False
        if not self.is_enabled(spec.name):
            _log.info("tool_disabled", tool=spec.name, source=spec.source)
            return False
        if spec.name in self._entries:
            _log.error(
                "tool_skipped", tool=spec.name, source=spec.source,
                why=f"name taken by {self._entries[spec.name].spec.source}",
            )
            return False
        if not spec.timeout_s > 0:
            _log.error("tool_skipped", tool=spec.name, source=spec.source, why="timeout must be positive")
            return False
        try:
            validator = compile_schema(spec.parameters)
        except (SchemaError, ValueError) as exc:
            _log.error("tool_skipped", tool=spec.name, source=spec.source, why=f"bad schema: {_first_line(exc)}")
            return False
        self._entries[spec.name] = Entry(spec, tool, validator)
        bisect.insort(self._names, spec.name)
        return True

    def replace_source(self, source: str, tools: Iterable[Tool]) -> list[str]:
        """Drop every tool from `source` and register `tools` under it; the names registered."""
        self.remove_source(source)
        return [t.spec.name for t in tools if self.add(t, source=source)]

    def remove_source(self, source: str) -> None:
        for name in [n for n, e in self._entries.items() if e.spec.source == source]:
            del self._entries[name]
            self._names.remove(name)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def page(self, after: str | None, size: int) -> tuple[list[Entry], bool]:
        """Up to `size` entries with names after `after`, by name; and whether more follow."""
        start = bisect.bisect_right(self._names, after) if after is not None else 0
        names = self._names[start : start + size]
        return [self._entries[n] for n in names], start + size < len(self._names)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._names)


def _first_line(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return message.splitlines()[0][:300]
