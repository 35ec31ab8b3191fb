"""OpenAI and any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama), over aiohttp.

Wire format: Chat Completions (https://platform.openai.com/docs/api-reference/chat). Streams ask
for usage (`stream_options.include_usage`): it arrives on a last chunk with no choices. Servers
that ignore the option send none; the core then estimates it and marks it so.

The calls are plain HTTP with one pooled aiohttp session per route, the stream decoded by `sse_batches`
(the WHATWG event-stream format); the text of the events that one network read brings leaves as one
delta. Why not the `openai` SDK, nor httpx2: the SDK's request building, auth wrapper and stream
classes cost about as much CPU per stream as the HTTP exchange itself, and this adapter needs none of
its types; and one streamed request to an instant upstream (9 events) costs ~0.13 ms of CPU with
aiohttp against ~0.38 ms with httpx2 (uvloop, keep-alive, same run), which was a third of the proxy's
CPU per request. What the SDK did for us is kept:
`Authorization: Bearer`, the `OPENAI_BASE_URL` / `OPENAI_ORG_ID` / `OPENAI_PROJECT_ID` environment
variables, proxies from the environment (`env_proxy`), no redirects followed, an `error` object inside
a stream, and the rest of the body read after `[DONE]` so the keep-alive connection is reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.parse
import urllib.request
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import aiohttp
from multidict import CIMultiDict

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


class HttpSession:
    """One route's pooled aiohttp session, opened on first use (a session belongs to the running loop).

    Timeouts as before with httpx: `connect_timeout_s` to open a connection, `timeout_s` for each read and
    for a free connection of the pool; no limit on the whole response, which the core bounds per route.
    """

    def __init__(self, connect_timeout_s: float, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=connect_timeout_s,
                                              sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=60),
                timeout=self._timeout,  # no trust_env: it asks the environment in a thread on every request
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (`HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY`, unless `NO_PROXY`
    covers the host), as httpx and the `openai` SDK read it. Looked up once per route: aiohttp's `trust_env`
    looks it up in a worker thread on every request, which tripled the CPU of a streamed request here."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


class StatusError(Exception):
    """The provider answered an HTTP error status (its body already read)."""

    def __init__(self, status: int, headers, body: bytes) -> None:
        super().__init__(status)
        self.status, self.headers, self.body = status, headers, body


class StreamError(Exception):
    """An `error` object inside a stream (OpenAI's way of failing after the 200)."""

    def __init__(self, error: object) -> None:
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(message if isinstance(message, str) and message else "An error occurred during streaming")


class NotAnEventStream(Exception):
    """A 2xx answer to a streamed request that is not `text/event-stream`."""


def provider_error(exc: Exception) -> ProviderError:
    """The one mapping of this adapter's failures (HTTP status, transport, stream contents) to provider errors."""
    if isinstance(exc, StatusError):
        try:
            body = json.loads(exc.body)
        except ValueError:
            body = None
        message = body_message(body, f"Error code: {exc.status}")
        return ProviderError(kind_for_status(exc.status), message, exc.status, retry_after_of(exc.headers))
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts (ServerTimeoutError is one)
        return ProviderError(TIMEOUT, "the provider did not answer in time")
    if isinstance(exc, NotAnEventStream):  # e.g. a 200 that is not an event stream: not worth a retry
        return ProviderError(OTHER, f"the provider's stream is malformed: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return ProviderError(CONNECTION, f"cannot reach the provider: {exc}")
    if isinstance(exc, StreamError):
        return ProviderError(OTHER, str(exc))
    if isinstance(exc, ValueError):  # a body or chunk that is not JSON
        return ProviderError(OTHER, f"the provider's answer is not JSON: {exc}")
    return ProviderError(OTHER, f"{type(exc).__name__}: {exc}")


async def sse_batches(pieces: AsyncIterable[bytes]) -> AsyncIterator[list[str]]:
    """The `data` of the events of a `text/event-stream` body, as the WHATWG HTML standard's "event stream
    interpretation" gives it: lines end in CRLF, LF or CR; `data` lines of one event join with LF; a blank
    line dispatches; comments and the other fields (`event`, `id`, `retry`) carry nothing this adapter uses;
    an event with no data is not dispatched, nor one the body ends in. `pieces`: the body in whatever pieces
    the network gives (`StreamReader.iter_any()`; no line-length limit, unlike `StreamReader.readline`).

    One list per piece that completes at least one event: the events that arrived together, which the
    adapter relays together (one text delta for the lot instead of one per event)."""
    buffer, data, pending_cr = b"", [], False
    async for piece in pieces:
        if pending_cr and piece.startswith(b"\n"):  # a CRLF split across two pieces
            piece = piece[1:]
        pending_cr = piece.endswith(b"\r")
        buffer += piece
        lines = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        buffer = lines.pop()  # the unfinished last line
        events = []
        for line in lines:
            if not line:
                if data:
                    events.append("\n".join(data))
                    data = []
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:].decode() if value.startswith(b" ") else value.decode())
        if events:
            yield events
    # At the end of the body, an event without its blank line is discarded, as the standard says.


async def sse_data(pieces: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The `data` of each event of a `text/event-stream` body, one by one (`sse_batches`, flattened)."""
    async with contextlib.aclosing(sse_batches(pieces)) as batches:
        async for events in batches:
            for data in events:
                yield data


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
                 estimator: UsageEstimator) -> None:
        self.route = route
        self.native_tools = route.native_tools
        self._estimator = estimator
        self._default_max_tokens = default_max_tokens
        self._key = route.api_key()
        self._http = HttpSession(connect_timeout_s, timeout_s)
        base = (route.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self._proxy = env_proxy(base)
        self._completions_url = f"{base}/chat/completions"
        self._models_url = f"{base}/models"
        # Built once: what the SDK sent (its key placeholder included), then the route's own headers on top.
        headers = {"Authorization": f"Bearer {self._key or 'none'}", "Accept": "application/json",
                   "Content-Type": "application/json"}
        for variable, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            if os.environ.get(variable):
                headers[header] = os.environ[variable]
        self._headers = CIMultiDict(headers)
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

    async def _post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST a chat completion; an error status raises `StatusError` with its body read."""
        response = await self._http.get().post(self._completions_url, data=json.dumps(body).encode(),
                                               headers=self._headers, proxy=self._proxy,
                                               allow_redirects=False)  # as the SDK (httpx) did
        if response.status >= 400:
            try:
                raise StatusError(response.status, response.headers, await response.read())
            finally:
                response.release()
        return response

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        self._require_key()
        chunks = _ChunkReader()
        try:
            response = await self._post(self.body(request, stream=True))
            try:  # also when the caller stops early: an unfinished body closes its connection
                if response.content_type != "text/event-stream":
                    raise NotAnEventStream(f"expected a text/event-stream answer, got {response.content_type!r}")
                async with contextlib.aclosing(sse_batches(response.content.iter_any())) as batches:
                    async for events in batches:
                        text, done, error = chunks.read(events)
                        if text:  # the events that arrived together leave as one delta
                            yield TextDelta(text)
                        if error is not None:
                            raise error
                        if done:
                            await _drain(response)
                            break
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError, StatusError, StreamError, NotAnEventStream, ValueError) as exc:
            raise provider_error(exc) from exc
        reason, calls = chunks.reason, chunks.calls
        for call in calls.done():
            yield ToolCallEvent(call)
        if calls and reason is not FinishReason.LENGTH:
            reason = FinishReason.TOOL_CALLS
        yield Finish(reason, chunks.usage)

    async def generate(self, request: GenerateRequest) -> Completion:
        self._require_key()
        try:
            response = await self._post(self.body(request, stream=False))
            try:
                answer = json.loads(await response.read())
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError, StatusError, ValueError) as exc:
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
            async with self._http.get().get(self._models_url, headers=self._headers, proxy=self._proxy) as response:
                return response.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def aclose(self) -> None:
        await self._http.aclose()


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what follows `[DONE]` (normally only the end of the body, already received), briefly: a
    connection goes back to the pool only once its response was read to the end."""
    if response.content.at_eof():
        return
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(DRAIN_S):
            while await response.content.readany():
                pass


class _ChunkReader:
    """The chunks of one stream: their text, batch by batch; tool-call fragments, finish reason and usage kept."""

    def __init__(self) -> None:
        self.reason, self.usage, self.calls = FinishReason.UNSPECIFIED, None, _CallAssembler()

    def read(self, events: list[str]) -> tuple[str, bool, Exception | None]:
        """The text of `events` (those one network read brought), whether `[DONE]` came, and what stopped the
        reading (an `error` chunk, a chunk that is not JSON) if anything did; the text before it is kept."""
        texts: list[str] = []
        try:
            for data in events:
                if not data:  # an empty event (a keep-alive of some servers): nothing to read
                    continue
                if data.startswith("[DONE]"):
                    return "".join(texts), True, None
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise StreamError(chunk["error"])
                if chunk.get("usage"):
                    self.usage = _usage(chunk["usage"])
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta")
                    if delta:
                        if delta.get("content"):
                            texts.append(delta["content"])
                        if delta.get("tool_calls"):
                            self.calls.add(delta["tool_calls"])
                    if choice.get("finish_reason"):
                        self.reason = FINISH.get(choice["finish_reason"], FinishReason.STOP)
        except (StreamError, ValueError) as exc:
            return "".join(texts), False, exc
        return "".join(texts), False, None


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
