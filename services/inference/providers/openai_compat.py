"""OpenAI and any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama), over httpx2.

Wire format: Chat Completions (https://platform.openai.com/docs/api-reference/chat). Streams ask
for usage (`stream_options.include_usage`): it arrives on a last chunk with no choices. Servers
that ignore the option send none; the core then estimates it and marks it so.

The calls are plain HTTP with the pooled httpx2 client, the stream parsed by httpx2's own SSE
decoder: the `openai` SDK's request building, auth wrapper and stream classes cost about as much CPU
per stream as the HTTP exchange itself, and this adapter needs none of its types. What the SDK did
for us is kept: `Authorization: Bearer`, the `OPENAI_BASE_URL` / `OPENAI_ORG_ID` / `OPENAI_PROJECT_ID`
environment variables, an `error` object inside a stream, and the rest of the body read after
`[DONE]` so the keep-alive connection is reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx2

from services.inference.domain import (
    Completion,
    Event,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    ProviderUsage,
    Role,
    TextDelta,
    TokenCount,
    ToolCall,
    ToolCallEvent,
    ToolDef,
    new_call_id,
)
from services.inference.providers.base import (
    AUTH,
    CONNECTION,
    OTHER,
    TIMEOUT,
    Provider,
    ProviderError,
    body_message,
    kind_for_status,
)
from services.inference.providers.base import retry_after as retry_after_of
from services.inference.routes import Route
from services.inference.tokens import UsageEstimator

OPENAI_BASE_URL = "https://api.openai.com/v1"
DRAIN_S = 0.1  # after [DONE]: how long to wait for the end of the body (normally already there)
FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}


def http_client(connect_timeout_s: float, timeout_s: float, transport: Any = None) -> httpx2.AsyncClient:
    """One pooled HTTP client per provider endpoint (keep-alive matters for overhead)."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(timeout_s, connect=connect_timeout_s),
        limits=httpx2.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60),
        transport=transport,
    )


class StatusError(Exception):
    """The provider answered an HTTP error status (its body already read)."""

    def __init__(self, response: httpx2.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class StreamError(Exception):
    """An `error` object inside a stream (OpenAI's way of failing after the 200)."""

    def __init__(self, error: object) -> None:
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(message if isinstance(message, str) and message else "An error occurred during streaming")


def provider_error(exc: Exception) -> ProviderError:
    """The one mapping of this adapter's failures (HTTP status, transport, stream contents) to provider errors."""
    if isinstance(exc, StatusError):
        r = exc.response
        try:
            body = r.json()
        except ValueError:
            body = None
        message = body_message(body, f"Error code: {r.status_code}")
        return ProviderError(kind_for_status(r.status_code), message, r.status_code, retry_after_of(r.headers))
    if isinstance(exc, httpx2.TimeoutException):
        return ProviderError(TIMEOUT, "the provider did not answer in time")
    if isinstance(exc, httpx2.SSEError):  # e.g. a 200 that is not an event stream: not worth a retry
        return ProviderError(OTHER, f"the provider's stream is malformed: {exc}")
    if isinstance(exc, httpx2.HTTPError):
        return ProviderError(CONNECTION, f"cannot reach the provider: {exc}")
    if isinstance(exc, StreamError):
        return ProviderError(OTHER, str(exc))
    if isinstance(exc, ValueError):  # a body or chunk that is not JSON
        return ProviderError(OTHER, f"the provider's answer is not JSON: {exc}")
    return ProviderError(OTHER, f"{type(exc).__name__}: {exc}")


def to_openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role is Role.TOOL:
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        elif m.role is Role.ASSISTANT and m.tool_calls:
            out.append({
                "role": "assistant",
                "content": m.content or None,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                    for c in m.tool_calls
                ],
            })
        else:
            out.append({"role": str(m.role), "content": m.content})
    return out


def to_openai_tools(tools: list[ToolDef]) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]


def _usage(raw: dict[str, Any] | None) -> ProviderUsage | None:
    if not raw:
        return None
    details = raw.get("prompt_tokens_details") or {}
    return ProviderUsage(prompt_tokens=raw.get("prompt_tokens") or 0,
                         completion_tokens=raw.get("completion_tokens") or 0,
                         cached_prompt_tokens=details.get("cached_tokens") or 0)


class OpenAIProvider(Provider):
    kind = "openai"

    def __init__(self, route: Route, *, timeout_s: float, connect_timeout_s: float, default_max_tokens: int,
                 estimator: UsageEstimator, transport: Any = None) -> None:
        self.route = route
        self.native_tools = route.native_tools
        self._estimator = estimator
        self._default_max_tokens = default_max_tokens
        self._key = route.api_key()
        self._http = http_client(connect_timeout_s, timeout_s, transport)
        base = (route.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self._completions_url = httpx2.URL(f"{base}/chat/completions")
        self._models_url = httpx2.URL(f"{base}/models")
        # Built once: what the SDK sent (its key placeholder included), then the route's own headers on top.
        self._headers = httpx2.Headers({"Authorization": f"Bearer {self._key or 'none'}",
                                        "Accept": "application/json", "Content-Type": "application/json"})
        for variable, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            if os.environ.get(variable):
                self._headers[header] = os.environ[variable]
        self._headers.update(route.headers or {})
        # api.openai.com wants max_completion_tokens (reasoning models reject max_tokens); servers want max_tokens.
        self._max_tokens_field = "max_completion_tokens" if route.base_url is None else "max_tokens"

    @property
    def _keyless(self) -> bool:
        """No key for api.openai.com (a server of our own, by base_url, may need none)."""
        return self._key is None and self.route.base_url is None

    def _require_key(self) -> None:
        if self._keyless:
            raise ProviderError(AUTH, f"no API key: set {self.route.api_key_env or 'OPENAI_API_KEY'}")

    def body(self, request: GenerateRequest, *, stream: bool) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": request.model,
            "messages": to_openai_messages(request.messages),
            self._max_tokens_field: s.max_tokens or self._default_max_tokens,
        }
        if s.temperature is not None:
            body["temperature"] = s.temperature
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        if request.tools:
            body["tools"] = to_openai_tools(request.tools)
            choice = request.effective_tool_choice
            body["tool_choice"] = (
                {"type": "function", "function": {"name": request.forced_tool}} if request.forced_tool else str(choice)
            )
        if request.response_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": request.response_schema},
            }
        if stream:
            body["stream"] = True
            if self.route.stream_usage:
                body["stream_options"] = {"include_usage": True}
        if self.route.extra_body:
            body.update(self.route.extra_body)
        return body

    async def _post(self, body: dict[str, Any], *, stream: bool) -> httpx2.Response:
        """POST a chat completion; an error status raises `StatusError` with its body read."""
        request = self._http.build_request("POST", self._completions_url, headers=self._headers,
                                           content=json.dumps(body).encode())
        response = await self._http.send(request, stream=stream)
        if response.is_error:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise StatusError(response)
        return response

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        self._require_key()
        reason, usage, calls = FinishReason.UNSPECIFIED, None, _CallAssembler()
        try:
            response = await self._post(self.body(request, stream=True), stream=True)
            try:  # closes the response when the caller stops early
                async with contextlib.aclosing(aiter(httpx2.EventSource(response))) as events:
                    async for sse in events:
                        if not sse.data:
                            continue
                        if sse.data.startswith("[DONE]"):
                            await _drain(events)
                            break
                        chunk = json.loads(sse.data)
                        if chunk.get("error"):
                            raise StreamError(chunk["error"])
                        if chunk.get("usage"):
                            usage = _usage(chunk["usage"])
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta")
                            if delta:
                                if delta.get("content"):
                                    yield TextDelta(delta["content"])
                                if delta.get("tool_calls"):
                                    calls.add(delta["tool_calls"])
                            if choice.get("finish_reason"):
                                reason = FINISH.get(choice["finish_reason"], FinishReason.STOP)
            finally:
                await response.aclose()
        except (httpx2.HTTPError, StatusError, StreamError, ValueError) as exc:
            raise provider_error(exc) from exc
        for call in calls.done():
            yield ToolCallEvent(call)
        if calls and reason is not FinishReason.LENGTH:
            reason = FinishReason.TOOL_CALLS
        yield Finish(reason, usage)

    async def generate(self, request: GenerateRequest) -> Completion:
        self._require_key()
        try:
            answer = (await self._post(self.body(request, stream=False), stream=False)).json()
        except (httpx2.HTTPError, StatusError, ValueError) as exc:
            raise provider_error(exc) from exc
        choices = answer.get("choices") or []
        if not choices:
            return Completion("", [], Finish(FinishReason.UNSPECIFIED, _usage(answer.get("usage"))))
        choice = choices[0]
        message = choice.get("message") or {}
        calls = [
            ToolCall(c.get("id") or new_call_id(), fn.get("name") or "", fn.get("arguments") or "{}")
            for c in message.get("tool_calls") or []
            if (fn := c.get("function"))
        ]
        reason = FINISH.get(choice.get("finish_reason") or "", FinishReason.STOP)
        if calls and reason is not FinishReason.LENGTH:
            reason = FinishReason.TOOL_CALLS
        return Completion(message.get("content") or "", calls, Finish(reason, _usage(answer.get("usage"))))

    async def count_tokens(self, messages: list[Message], tools: list[ToolDef]) -> TokenCount:
        window = self.route.context_window or 0
        return TokenCount(self._estimator.prompt_tokens(messages, tools), window, estimated=True)

    async def check(self) -> bool:
        if self._keyless:
            return False
        try:
            response = await self._http.get(self._models_url, headers=self._headers)
        except httpx2.HTTPError:
            return False
        return not response.is_error

    async def aclose(self) -> None:
        await self._http.aclose()


async def _drain(events: AsyncIterator[httpx2.ServerSentEvent]) -> None:
    """Read what follows `[DONE]` (normally only the end of the body, already received), briefly: an HTTP/1.1
    connection goes back to the pool only once its response was read to the end."""
    with contextlib.suppress(TimeoutError, httpx2.HTTPError):
        async with asyncio.timeout(DRAIN_S):
            async for _ in events:
                pass


class _CallAssembler:
    """Tool calls arrive in pieces keyed by index: id and name first, then argument fragments."""

    def __init__(self) -> None:
        self._parts: dict[int, list[Any]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> None:
        for d in deltas:
            part = self._parts.setdefault(d.get("index") or 0, [None, "", []])
            if d.get("id"):
                part[0] = d["id"]
            fn = d.get("function")
            if fn:
                if fn.get("name") and not part[1]:  # sent whole, once (some servers repeat it on every chunk)
                    part[1] = fn["name"]
                if fn.get("arguments"):
                    part[2].append(fn["arguments"])

    def __bool__(self) -> bool:
        return bool(self._parts)

    def done(self) -> list[ToolCall]:
        calls = []
        for _index, (call_id, name, args) in sorted(self._parts.items()):
            arguments = "".join(args) or "{}"
            calls.append(ToolCall(call_id or new_call_id(), name, arguments))
        return calls
