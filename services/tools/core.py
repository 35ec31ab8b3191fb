"""What a tool is: its spec, how it runs, how it fails.

Every tool (built-in, plugin, MCP, HTTP API) is a `Tool`: a `ToolSpec` (name,
description, JSON schema of the arguments, time limit, side-effect flag, source)
and an async `run(args, call)` that returns a JSON-serialisable value. A tool
signals a failure the model should read by raising `ToolError`; the executor turns
it (and any timeout or crash) into a structured result, never an RPC error.

Plugins can write tools as plain functions with the `tool` decorator:

    @tool("shout", "Upper-cases a text.", {"type": "object", "properties": {"text": {"type": "string"}},
                                           "required": ["text"]})
    async def shout(text: str) -> dict:
        return {"text": text.upper()}
"""

from __future__ import annotations

import asyncio
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_TIMEOUT_S = 20.0


class ToolError(Exception):
    """A failure the model can read and act on (becomes OUTCOME_ERROR with this message)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ToolSpec:
    """What the registry lists about a tool."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    timeout_s: float = DEFAULT_TIMEOUT_S
    side_effects: bool = False
    source: str = "builtin"


@dataclass(frozen=True)
class CallContext:
    """Who a tool runs for: passed to every `Tool.run`."""

    user_id: str
    call_id: str = ""
    request_id: str | None = None


class Tool(ABC):
    """A tool: a spec and an async run. `run` gets arguments already checked against the schema."""

    spec: ToolSpec

    @abstractmethod
    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        """Do the work; return a JSON-serialisable value or raise `ToolError`."""


@dataclass
class FunctionTool(Tool):
    """A tool made from a function called with the arguments as keywords.

    Async functions run on the event loop; plain functions run in a worker thread (a
    thread cannot be interrupted, so a sync function past its time limit keeps its
    thread until it returns). A parameter named `call` receives the `CallContext`.
    """

    spec: ToolSpec
    fn: Callable[..., Any]
    _wants_call: bool = field(init=False)

    def __post_init__(self) -> None:
        self._wants_call = "call" in inspect.signature(self.fn).parameters

    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        kwargs = dict(args)
        if self._wants_call:
            kwargs["call"] = call
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**kwargs)
        return await asyncio.to_thread(self.fn, **kwargs)


def tool(
    name: str,
    description: str,
    parameters: Mapping[str, Any],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    side_effects: bool = False,
) -> Callable[[Callable[..., Any]], FunctionTool]:
    """Decorator: turn a function into a `FunctionTool` (for plugins and built-ins alike)."""

    def wrap(fn: Callable[..., Any]) -> FunctionTool:
        return FunctionTool(ToolSpec(name, description, parameters, timeout_s, side_effects), fn)

    return wrap
