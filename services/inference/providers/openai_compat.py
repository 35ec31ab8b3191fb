"""OpenAI and any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama) through the `openai` SDK.

Wire format: Chat Completions (https://platform.openai.com/docs/api-reference/chat). Streams ask
for usage (`stream_options.include_usage`): it arrives on a last chunk with no choices. Servers
that ignore the option send none; the core then estimates it and marks it so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai

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


def openai_error(exc: Exception) -> ProviderError:
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(TIMEOUT, "the provider did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(CONNECTION, f"cannot reach the provider: {exc.__cause__ or exc}")
    if isinstance(exc, openai.APIStatusError):
        return ProviderError(kind_for_status(exc.status_code), body_message(exc.body, exc.message), exc.status_code,
                             retry_after_of(exc.response.headers))
    if isinstance(exc, openai.APIError):  # an error event inside a stream
        return ProviderError(OTHER, exc.message)
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
        self.client = openai.AsyncOpenAI(
            api_key=self._key or "none", base_url=route.base_url, max_retries=0,  # retries: the core's tenacity
            default_headers=route.headers or None, http_client=self._http,
        )
        # api.openai.com wants max_completion_tokens (reasoning models reject max_tokens); servers want max_tokens.
        self._max_tokens_field = "max_completion_tokens" if route.base_url is None else "max_tokens"

    def _require_key(self) -> None:
        if self._key is None and self.route.base_url is None:
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

    async def _post(self, body: dict[str, Any], stream: bool) -> Any:
        """The SDK's generic request method (its documented way to send any body): the SDK still does the
        HTTP, headers, auth and error mapping, but answers and stream chunks stay plain dicts, which spares
        building typed models for every chunk (most of the SDK's cost per stream on the hot path)."""
        return await self.client.post("/chat/completions", body=body, cast_to=object, stream=stream,
                                      stream_cls=openai.AsyncStream[object] if stream else None)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        self._require_key()
        reason, usage, calls = FinishReason.UNSPECIFIED, None, _CallAssembler()
        try:
            chunks = await self._post(self.body(request, stream=True), stream=True)
            async with chunks:  # closes the response when the caller stops early
                async for chunk in chunks:
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
        except openai.OpenAIError as exc:
            raise openai_error(exc) from exc
        except httpx2.HTTPError as exc:  # a broken stream
            raise ProviderError(CONNECTION, f"the stream broke: {exc}") from exc
        for call in calls.done():
            yield ToolCallEvent(call)
        if calls and reason is not FinishReason.LENGTH:
            reason = FinishReason.TOOL_CALLS
        yield Finish(reason, usage)

    async def generate(self, request: GenerateRequest) -> Completion:
        self._require_key()
        try:
            answer = await self._post(self.body(request, stream=False), stream=False)
        except openai.OpenAIError as exc:
            raise openai_error(exc) from exc
        except httpx2.HTTPError as exc:
            raise ProviderError(CONNECTION, f"the request broke: {exc}") from exc
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
        if self._key is None and self.route.base_url is None:
            return False
        try:
            await self.client.models.list()
        except openai.OpenAIError:
            return False
        return True

    async def aclose(self) -> None:
        await self._http.aclose()


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
