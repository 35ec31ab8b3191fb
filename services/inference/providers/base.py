"""What every provider adapter implements, and the one error type adapters raise."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2

from services.inference.domain import (
    Completion,
    Event,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    TextDelta,
    TokenCount,
    ToolCall,
    ToolCallEvent,
    ToolDef,
)

# Kinds of provider failure. Retryable ones are retried (with backoff) and count towards a cooldown.
CONNECTION, TIMEOUT, RATE_LIMIT, SERVER = "connection", "timeout", "rate_limit", "server"
BAD_REQUEST, AUTH, NOT_FOUND, OTHER = "bad_request", "auth", "not_found", "other"
RETRYABLE = frozenset({CONNECTION, TIMEOUT, RATE_LIMIT, SERVER})


@dataclass(eq=False)
class ProviderError(Exception):
    """A provider failed. `kind` says how; `retry_after_s` comes from the provider's Retry-After."""

    kind: str
    message: str
    status: int | None = None
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.kind}{f' (HTTP {self.status})' if self.status else ''}: {self.message}"

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


def sdk_http_client(connect_timeout_s: float, timeout_s: float, transport: Any = None) -> httpx2.AsyncClient:
    """The pooled HTTP client handed to a provider SDK built on httpx2 (Anthropic's, Google's); `transport`
    lets tests answer in-process. Keep-alive matters for overhead."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(timeout_s, connect=connect_timeout_s),
        limits=httpx2.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60),
        transport=transport,
    )


def kind_for_status(status: int) -> str:
    """Classify an HTTP status the way every provider documents it."""
    if status in (408, 504):
        return TIMEOUT
    if status == 429:
        return RATE_LIMIT
    if status >= 500 or status == 409:  # 409: OpenAI's documented "retry" conflict; 529: Anthropic overloaded
        return SERVER
    if status in (401, 403):
        return AUTH
    if status == 404:
        return NOT_FOUND
    if 400 <= status < 500:
        return BAD_REQUEST
    return OTHER


def body_message(body: object, fallback: str) -> str:
    """The human message of a provider's JSON error body ({"message"} or {"error": {"message"}})."""
    if isinstance(body, dict):
        inner = body.get("error")
        for candidate in (body.get("message"), inner.get("message") if isinstance(inner, dict) else None):
            if isinstance(candidate, str) and candidate:
                return candidate
    return fallback


def retry_after(headers) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header, when a number."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


class Provider(abc.ABC):
    """One route's adapter. `stream` is the one required generation path."""

    kind: str = ""
    native_tools: bool = True

    @abc.abstractmethod
    def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Text deltas and complete tool calls, then exactly one `Finish`."""

    async def generate(self, request: GenerateRequest) -> Completion:
        """A whole answer. Default: collect `stream`; hosted providers use their unary API."""
        return await collect(self.stream(request))

    @abc.abstractmethod
    async def count_tokens(self, messages: list[Message], tools: list[ToolDef]) -> TokenCount:
        """Prompt tokens of `messages` (with `tools`) for this route's model."""

    @abc.abstractmethod
    async def check(self) -> bool:
        """Whether the provider answers (a cheap call such as listing models)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


async def collect(events: AsyncIterator[Event]) -> Completion:
    parts: list[str] = []
    calls: list[ToolCall] = []
    finish = Finish(FinishReason.UNSPECIFIED)
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, ToolCallEvent):
            calls.append(event.call)
        else:
            finish = event
    return Completion("".join(parts), calls, finish)
