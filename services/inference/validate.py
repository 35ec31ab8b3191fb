"""Request validation: every problem of a request, each named by its field path, in one error."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema

from parley.runtime.errors import InvalidArgument
from services.inference.domain import GenerateRequest, Message, Role, ToolChoice, ToolDef

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_DESCRIPTION_CHARS = 8192
ROLES = "ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"


class Problems:
    """Collects field violations; `raise_if_any` raises one INVALID_ARGUMENT naming them all."""

    def __init__(self) -> None:
        self.violations: dict[str, str] = {}

    def add(self, field: str, why: str) -> None:
        self.violations.setdefault(field, why)

    def raise_if_any(self) -> None:
        if not self.violations:
            return
        items = list(self.violations.items())
        message = "; ".join(f"{field}: {why}" for field, why in items[:5])
        if len(items) > 5:
            message += f"; and {len(items) - 5} more"
        raise InvalidArgument(message=message, violations=self.violations)


@functools.lru_cache(maxsize=512)
def _schema_problem(schema_json: str) -> str | None:
    schema = json.loads(schema_json)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"is not a valid JSON schema: {exc.message}"
    return None


def schema_problem(schema: dict[str, Any]) -> str | None:
    return _schema_problem(json.dumps(schema, sort_keys=True))


def validate_messages(messages: list[Message], problems: Problems) -> int:
    """Checks roles, contents and tool-call pairing; returns the characters seen."""
    if not messages:
        problems.add("messages", "at least one message is required")
        return 0
    seen_calls: set[str] = set()
    chars = 0
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        chars += len(m.content)
        if "\x00" in m.content:
            problems.add(f"{at}.content", "must not contain NUL characters")
        if m.role is None:
            problems.add(f"{at}.role", f"must be {ROLES}")
            continue
        if m.tool_calls and m.role is not Role.ASSISTANT:
            problems.add(f"{at}.tool_calls", "only assistant messages carry tool calls")
        if m.role in (Role.SYSTEM, Role.USER) and not m.content.strip():
            problems.add(f"{at}.content", f"a {m.role} message must not be empty")
        elif m.role is Role.ASSISTANT and not m.content and not m.tool_calls:
            problems.add(f"{at}", "an assistant message needs content or tool_calls")
        elif m.role is Role.TOOL:
            if not m.tool_call_id:
                problems.add(f"{at}.tool_call_id", "is required for a tool message")
            elif m.tool_call_id not in seen_calls:
                problems.add(f"{at}.tool_call_id",
                             f"{m.tool_call_id[:64]!r} answers no tool call of an earlier assistant message")
        for j, call in enumerate(m.tool_calls):
            where = f"{at}.tool_calls[{j}]"
            chars += len(call.arguments_json)
            if not call.id:
                problems.add(f"{where}.id", "is required")
            if not TOOL_NAME_RE.match(call.name):
                problems.add(f"{where}.name", "must be 1-64 characters of letters, digits, _ and -")
            try:
                if not isinstance(json.loads(call.arguments_json or "{}"), dict):
                    problems.add(f"{where}.arguments_json", "must be a JSON object")
            except ValueError:
                problems.add(f"{where}.arguments_json", "is not valid JSON")
            seen_calls.add(call.id)
    return chars


def validate_tools(tools: list[ToolDef], problems: Problems) -> int:
    if len(tools) > MAX_TOOLS:
        problems.add("tools", f"at most {MAX_TOOLS} tools; got {len(tools)}")
    names: set[str] = set()
    chars = 0
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        chars += len(tool.description)
        if not TOOL_NAME_RE.match(tool.name):
            why = "is required" if not tool.name else (
                f"is {len(tool.name)} characters long; the limit is 64" if len(tool.name) > 64
                else "must contain only letters, digits, _ and -")
            problems.add(f"{at}.name", why)
        elif tool.name in names:
            problems.add(f"{at}.name", f"{tool.name!r} is defined twice")
        names.add(tool.name)
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            problems.add(f"{at}.description", f"is longer than {MAX_DESCRIPTION_CHARS} characters")
        if tool.parameters.get("type", "object") != "object":
            problems.add(f"{at}.parameters", "must be a JSON schema of an object ({\"type\": \"object\", ...})")
        elif (why := schema_problem(tool.parameters)) is not None:
            problems.add(f"{at}.parameters", why)
    return chars


def validate_request(request: GenerateRequest, *, max_chars: int) -> None:
    """Everything about a request that does not depend on the model (raises InvalidArgument)."""
    problems = Problems()
    chars = validate_messages(request.messages, problems)
    chars += validate_tools(request.tools, problems)
    names = [t.name for t in request.tools]
    choice = request.tool_choice
    if choice is ToolChoice.REQUIRED and not request.tools:
        problems.add("tool_choice", "TOOL_CHOICE_REQUIRED needs at least one tool")
    if request.forced_tool:
        if choice is not ToolChoice.REQUIRED:
            problems.add("forced_tool", "is only allowed with tool_choice TOOL_CHOICE_REQUIRED")
        elif request.forced_tool not in names:
            problems.add("forced_tool", f"{request.forced_tool[:64]!r} is not among the tools ({', '.join(names)})")
    if request.response_schema is not None:
        if choice is ToolChoice.REQUIRED:
            problems.add("response_schema", "cannot be combined with tool_choice TOOL_CHOICE_REQUIRED")
        elif (why := schema_problem(request.response_schema)) is not None:
            problems.add("response_schema", why)
    s = request.sampling
    if s.max_tokens < 0:
        problems.add("sampling.max_tokens", "must not be negative (0 means the server default)")
    if s.temperature is not None and not 0 <= s.temperature <= 2:
        problems.add("sampling.temperature", "must be between 0 and 2")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        problems.add("sampling.top_p", "must be greater than 0 and at most 1")
    if len(s.stop) > MAX_STOPS:
        problems.add("sampling.stop", f"at most {MAX_STOPS} stop sequences")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            problems.add(f"sampling.stop[{i}]", f"must be 1-{MAX_STOP_CHARS} characters")
    if chars > max_chars:
        problems.add("messages", f"the request has {chars} characters of text; the limit is {max_chars}")
    problems.raise_if_any()


def validate_max_tokens(request: GenerateRequest, route_name: str, context_window: int | None,
                        max_output: int | None) -> None:
    """max_tokens against the model: at most its output limit and its context window."""
    asked = request.sampling.max_tokens
    limit = min(x for x in (context_window, max_output) if x) if (context_window or max_output) else None
    if asked and limit is not None and asked > limit:
        what = "output limit" if max_output and limit == max_output else "context window"
        raise InvalidArgument(
            message=f"sampling.max_tokens: {asked} exceeds the {what} of {route_name} ({limit} tokens); "
            f"use 1-{limit}, or 0 for the default",
            violations={"sampling.max_tokens": f"must be between 1 and {limit}"},
        )
