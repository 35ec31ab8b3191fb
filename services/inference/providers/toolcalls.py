"""Tool calling for models without native tool support: the model writes one JSON object
`{"name": ..., "arguments": {...}}` under a JSON-schema constraint (a llama.cpp grammar, or vLLM's
guided decoding), so the arguments always parse and match the tool's schema.
"""

from __future__ import annotations

import json
from typing import Any

from services.inference.domain import Message, Role, ToolCall, ToolDef, new_call_id

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that lists its properties and
    says nothing about others. Everything valid against the result is valid against `schema`; for
    constrained decoding it keeps a small model from inventing properties without end."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) if key in _SUBSCHEMAS else value for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    for defs in ("$defs", "definitions"):
        if isinstance(schema.get(defs), dict):
            out[defs] = {name: closed(sub) for name, sub in schema[defs].items()}
    return out


_SUBSCHEMAS = frozenset({"items", "anyOf", "oneOf", "allOf", "not", "prefixItems", "additionalProperties"})


def call_schema(tools: list[ToolDef], only: str = "") -> dict[str, Any]:
    """JSON schema of one call of any of `tools` (or of the tool named `only`), closed (see `closed`)."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": closed(tool.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
        if not only or tool.name == only
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_prompt(tools: list[ToolDef], forced: str = "") -> str:
    """System-prompt text that describes the tools and how to call one."""
    lines = ["You can call these tools:"]
    for tool in tools:
        lines.append(json.dumps({"name": tool.name, "description": tool.description, "parameters": tool.parameters},
                                separators=(",", ":"), ensure_ascii=False))
    if forced:
        lines.append(f"Call the tool {forced} now.")
    lines.append(
        f'To call a tool, answer only with {CALL_OPEN}{{"name": <tool name>, "arguments": <arguments object>}}'
        f"{CALL_CLOSE}. Otherwise answer normally."
    )
    return "\n".join(lines)


def with_tools_prompt(messages: list[Message], tools: list[ToolDef], forced: str = "") -> list[Message]:
    """`messages` with the tools described in the (first) system message."""
    note = tools_prompt(tools, forced)
    if messages and messages[0].role is Role.SYSTEM:
        return [Message(Role.SYSTEM, f"{messages[0].content}\n\n{note}"), *messages[1:]]
    return [Message(Role.SYSTEM, note), *messages]


def parse_call(text: str) -> ToolCall:
    """The `ToolCall` in a constrained `{"name", "arguments"}` answer (raises ValueError if malformed)."""
    data = json.loads(text, strict=False)  # a raw control character inside a string is kept, not fatal
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(
        data.get("arguments"), dict
    ):
        raise ValueError(f"not a tool call: {text[:200]!r}")
    return ToolCall(new_call_id(), data["name"], json.dumps(data["arguments"], ensure_ascii=False))


def as_plain_messages(messages: list[Message]) -> list[dict[str, str]]:
    """Role/content dicts for a chat template: assistant tool calls and tool results written as text."""
    out: list[dict[str, str]] = []
    for message in messages:
        content = message.content
        if message.role is Role.ASSISTANT and message.tool_calls:
            calls = "\n".join(
                f'{CALL_OPEN}{{"name": {json.dumps(c.name)}, "arguments": {c.arguments_json}}}{CALL_CLOSE}'
                for c in message.tool_calls
            )
            content = f"{content}\n{calls}" if content else calls
        elif message.role is Role.TOOL:
            content = json.dumps({"tool_call_id": message.tool_call_id, "name": message.name, "result": content},
                                 ensure_ascii=False)
        out.append({"role": str(message.role), "content": content})
    return out
