"""A scripted model and two test tools, for deterministic tests of the chat agent loop.

`ScriptedProvider` is a real inference `Provider`: the inference service builds it for a route
`{"provider": "plugin", "plugin": "scripted"}` from the `parley.inference.providers` entry point
that `install_plugins` declares, exactly as it builds any other adapter. Each request it receives
is recorded and answered with the next `Reply` of its script (text and/or tool calls, with usage);
a request with no reply left fails as a rejected request, so a test notices an unexpected call.

The same distribution declares a `parley.tools` entry point for `slow_echo` (sleeps, then says when
it ran: two calls that overlap in time ran concurrently) and `post_note` (side-effecting: it needs
the user's approval; each real execution is appended to `NOTES`).

Everything runs in the test process, so a test reads the provider (`PROVIDERS[route name]`) and
`NOTES` directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from parley.runtime.config import InferenceSettings
from services.inference.domain import (
    Event,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    ProviderUsage,
    TextDelta,
    TokenCount,
    ToolCall,
    ToolCallEvent,
    ToolDef,
)
from services.inference.providers.base import BAD_REQUEST, SERVER, Provider, ProviderError
from services.inference.routes import Route
from services.tools.core import tool

DIST = "parley_chat_scripted-1.0.dist-info"
ENTRY_POINTS = """
[parley.inference.providers]
scripted = tests.chat.scripted:ScriptedProvider

[parley.tools]
chat_agent_testkit = tests.chat.scripted:make_tools
"""

PROVIDERS: dict[str, ScriptedProvider] = {}  # route name -> the provider the inference service built
NOTES: list[str] = []  # what post_note really did


def install_plugins(root: Path) -> Path:
    """Declare the entry points in a distribution under `root` (put `root` on sys.path to install it)."""
    info = root / DIST
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parley-chat-scripted\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@dataclass
class Reply:
    """One scripted completion: text, tool calls ((name, arguments) — a dict, or a raw string), usage."""

    text: str = ""
    calls: list[tuple[str, dict | str]] = field(default_factory=list)
    prompt_tokens: int = 100
    completion_tokens: int = 10
    fail: str = ""  # a ProviderError kind (e.g. SERVER): the provider fails instead of answering


def say(text: str, **usage) -> Reply:
    return Reply(text=text, **usage)


def fail(kind: str = SERVER) -> Reply:
    """The provider fails (a 5xx by default), as a real one may."""
    return Reply(fail=kind)


def call(*calls: tuple[str, dict | str], **usage) -> Reply:
    return Reply(calls=list(calls), **usage)


class ScriptedProvider(Provider):
    kind = "plugin"

    def __init__(self, route: Route, settings: InferenceSettings) -> None:
        self.route = route
        self.native_tools = route.native_tools
        self.script: deque[Reply] = deque()
        self.requests: list[GenerateRequest] = []
        self._calls = 0
        PROVIDERS[route.name] = self

    def play(self, *replies: Reply) -> ScriptedProvider:
        """Answer the next requests with `replies`, in order (forgets earlier requests and replies)."""
        self.script = deque(replies)
        self.requests = []
        return self

    @property
    def left(self) -> int:
        return len(self.script)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        self.requests.append(request)
        if not self.script:
            raise ProviderError(BAD_REQUEST, f"the script has no reply left for request #{len(self.requests)}")
        reply = self.script.popleft()
        if reply.fail:
            raise ProviderError(reply.fail, "scripted failure", status=503 if reply.fail == SERVER else None)
        words = reply.text.split(" ")
        for i, word in enumerate(words if reply.text else []):
            yield TextDelta(word if i == len(words) - 1 else word + " ")
            await asyncio.sleep(0)
        for name, arguments in reply.calls:
            self._calls += 1
            raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
            yield ToolCallEvent(ToolCall(f"call_{self.route.name}_{self._calls}", name, raw))
        reason = FinishReason.TOOL_CALLS if reply.calls else FinishReason.STOP
        yield Finish(reason, ProviderUsage(reply.prompt_tokens, reply.completion_tokens))

    async def count_tokens(self, messages: list[Message], tools: list[ToolDef]) -> TokenCount:
        chars = sum(len(m.content) for m in messages) + sum(len(t.description) for t in tools)
        return TokenCount(chars // 4 + 1, self.route.context_window or 0, estimated=True)

    async def check(self) -> bool:
        return True


# -- tools -----------------------------------------------------------------------------------------

OBJECT = {"type": "object", "additionalProperties": False}
TEXT = {"text": {"type": "string", "maxLength": 200}}
SLOW_ECHO_S = 0.4


@tool("slow_echo", "Repeats a text after a short pause.", {**OBJECT, "properties": TEXT, "required": ["text"]})
async def slow_echo(text: str) -> dict:
    started = time.time()
    await asyncio.sleep(SLOW_ECHO_S)
    return {"text": text, "started": started, "ended": time.time()}


@tool("post_note", "Posts a note on the team board.", {**OBJECT, "properties": TEXT, "required": ["text"]},
      side_effects=True)
def post_note(text: str) -> dict:
    NOTES.append(text)
    return {"posted": True, "text": text}


def make_tools(host) -> list:
    return [slow_echo, post_note]
