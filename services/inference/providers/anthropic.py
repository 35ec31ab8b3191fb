"""Anthropic's Messages API through the official `anthropic` SDK.

Wire format: https://docs.anthropic.com/en/api/messages (unary) and
https://docs.anthropic.com/en/api/messages-streaming (SSE: message_start carries the input usage,
content blocks stream as text_delta / input_json_delta, message_delta carries the stop reason and the
output usage). Usage is normalised: prompt tokens = input + cache reads + cache writes.
The SDK (2.x, API version 2026-10-21) has no sampling parameters: temperature, top_p and seed are
not sent. `response_schema` uses the API's JSON output format (`output_config.format`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic

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
    ToolChoice,
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
    sdk_http_client,
)
from services.inference.providers.base import retry_after as retry_after_of
from services.inference.routes import Route

STOP = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}


def anthropic_error(exc: Exception) -> ProviderError:
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderError(TIMEOUT, "Anthropic did not answer in time")
    if isinstance(exc, anthropic.APIConnectionError):
        return ProviderError(CONNECTION, f"cannot reach Anthropic: {exc.__cause__ or exc}")
    if isinstance(exc, anthropic.APIStatusError):
        return ProviderError(kind_for_status(exc.status_code), body_message(exc.body, exc.message), exc.status_code,
                             retry_after_of(exc.response.headers))
    return ProviderError(OTHER, f"{type(exc).__name__}: {exc}")


def to_anthropic(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """(system text, messages): tool results become user `tool_result` blocks; same-role turns merge."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role is Role.SYSTEM:
            system.append(m.content)
            continue
        blocks: list[dict[str, Any]] = []
        if m.role is Role.TOOL:
            blocks.append({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content})
        elif m.content:
            blocks.append({"type": "text", "text": m.content})
        for call in m.tool_calls:
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name,
                           "input": json.loads(call.arguments_json)})
        role = "assistant" if m.role is Role.ASSISTANT else "user"
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return "\n\n".join(system), out


def _usage(raw: Any, output_tokens: int | None = None) -> ProviderUsage:
    read = raw.cache_read_input_tokens or 0
    written = raw.cache_creation_input_tokens or 0
    return ProviderUsage(
        prompt_tokens=(raw.input_tokens or 0) + read + written,
        completion_tokens=raw.output_tokens if output_tokens is None else output_tokens,
        cached_prompt_tokens=read,
        cache_write_tokens=written,
    )


class AnthropicProvider(Provider):
    kind = "anthropic"

    def __init__(self, route: Route, *, timeout_s: float, connect_timeout_s: float, default_max_tokens: int,
                 transport: Any = None) -> None:
        self.route = route
        self._default_max_tokens = default_max_tokens
        self._key = route.api_key()
        self._http = sdk_http_client(connect_timeout_s, timeout_s, transport)
        self.client = anthropic.AsyncAnthropic(
            api_key=self._key or "missing", base_url=route.base_url, max_retries=0,
            default_headers=route.headers or None, http_client=self._http,
        )

    def _params(self, request: GenerateRequest) -> dict[str, Any]:
        self._require_key()
        system, messages = to_anthropic(request.messages)
        params: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.sampling.max_tokens or self._default_max_tokens,
        }
        if system:
            params["system"] = system
        if request.sampling.stop:
            params["stop_sequences"] = list(request.sampling.stop)
        if request.tools:
            params["tools"] = [{"name": t.name, "description": t.description, "input_schema": t.parameters}
                               for t in request.tools]
            choice = request.effective_tool_choice
            params["tool_choice"] = (
                {"type": "tool", "name": request.forced_tool} if request.forced_tool
                else {"type": {ToolChoice.AUTO: "auto", ToolChoice.NONE: "none", ToolChoice.REQUIRED: "any"}[choice]}
            )
        if request.response_schema is not None:
            params["output_config"] = {"format": {"type": "json_schema", "schema": request.response_schema}}
        return params

    def _require_key(self) -> None:
        if self._key is None:
            raise ProviderError(AUTH, f"no API key: set {self.route.api_key_env or 'ANTHROPIC_API_KEY'}")

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        params = self._params(request)
        usage, reason = ProviderUsage(), FinishReason.UNSPECIFIED
        tools: dict[int, list[Any]] = {}  # content block index -> [id, name, json fragments]
        try:
            async with await self.client.messages.create(**params, stream=True) as events:
                async for event in events:
                    kind = event.type
                    if kind == "content_block_delta":
                        delta = event.delta
                        if delta.type == "text_delta":
                            yield TextDelta(delta.text)
                        elif delta.type == "input_json_delta" and event.index in tools:
                            tools[event.index][2].append(delta.partial_json)
                    elif kind == "content_block_start" and event.content_block.type == "tool_use":
                        tools[event.index] = [event.content_block.id, event.content_block.name, []]
                    elif kind == "content_block_stop" and event.index in tools:
                        call_id, name, parts = tools.pop(event.index)
                        yield ToolCallEvent(ToolCall(call_id or new_call_id(), name, "".join(parts) or "{}"))
                    elif kind == "message_start":
                        usage = _usage(event.message.usage)
                    elif kind == "message_delta":
                        if event.delta.stop_reason:
                            reason = STOP.get(event.delta.stop_reason, FinishReason.STOP)
                        # message_delta usage is cumulative; input counts appear there on newer API versions.
                        if event.usage.input_tokens is not None:
                            usage = _usage(event.usage)
                        else:
                            usage.completion_tokens = event.usage.output_tokens
        except anthropic.AnthropicError as exc:
            raise anthropic_error(exc) from exc
        yield Finish(reason, usage)

    async def generate(self, request: GenerateRequest) -> Completion:
        params = self._params(request)
        try:
            message = await self.client.messages.create(**params)
        except anthropic.AnthropicError as exc:
            raise anthropic_error(exc) from exc
        text = "".join(b.text for b in message.content if b.type == "text")
        calls = [ToolCall(b.id, b.name, json.dumps(b.input, ensure_ascii=False))
                 for b in message.content if b.type == "tool_use"]
        reason = STOP.get(message.stop_reason or "", FinishReason.STOP)
        return Completion(text, calls, Finish(reason, _usage(message.usage)))

    async def count_tokens(self, messages: list[Message], tools: list[ToolDef]) -> TokenCount:
        """Exact, from the API's token-counting endpoint (POST /v1/messages/count_tokens)."""
        self._require_key()
        system, converted = to_anthropic(messages)
        params: dict[str, Any] = {"model": self.route.provider_model, "messages": converted}
        if system:
            params["system"] = system
        if tools:
            params["tools"] = [{"name": t.name, "description": t.description, "input_schema": t.parameters}
                               for t in tools]
        try:
            counted = await self.client.messages.count_tokens(**params)
        except anthropic.AnthropicError as exc:
            raise anthropic_error(exc) from exc
        return TokenCount(counted.input_tokens, self.route.context_window or 0, estimated=False)

    async def check(self) -> bool:
        if self._key is None:
            return False
        try:
            await self.client.models.retrieve(self.route.provider_model)
        except anthropic.AnthropicError:
            return False
        return True

    async def aclose(self) -> None:
        await self._http.aclose()
