"""Google's Gemini API through the official `google-genai` SDK.

Wire format: https://ai.google.dev/api/generate-content (`models/{model}:generateContent`, and
`:streamGenerateContent?alt=sse`, whose SSE events are each a GenerateContentResponse). Usage comes
from `usageMetadata`; thinking tokens are billed as output, so completion tokens = candidates +
thoughts, and prompt tokens include tool-use prompt tokens.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

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
from services.inference.providers.base import AUTH, CONNECTION, OTHER, TIMEOUT, Provider, ProviderError, kind_for_status
from services.inference.providers.base import sdk_http_client
from services.inference.providers.base import collect as collect_events
from services.inference.providers.base import retry_after as retry_after_of
from services.inference.routes import Route

FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
MODES = {ToolChoice.AUTO: "AUTO", ToolChoice.NONE: "NONE", ToolChoice.REQUIRED: "ANY"}


def gemini_error(exc: Exception) -> ProviderError:
    if isinstance(exc, genai_errors.APIError):
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        return ProviderError(kind_for_status(exc.code), exc.message or str(exc), exc.code, retry_after_of(headers))
    if isinstance(exc, httpx2.TimeoutException):
        return ProviderError(TIMEOUT, "Gemini did not answer in time")
    if isinstance(exc, httpx2.HTTPError):
        return ProviderError(CONNECTION, f"cannot reach Gemini: {exc}")
    return ProviderError(OTHER, f"{type(exc).__name__}: {exc}")


def to_gemini(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """(system instruction, contents): tool results are user `functionResponse` parts."""
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for m in messages:
        if m.role is Role.SYSTEM:
            system.append(m.content)
            continue
        parts: list[dict[str, Any]] = []
        if m.role is Role.TOOL:
            try:
                output = json.loads(m.content)
            except ValueError:
                output = m.content
            parts.append({"function_response": {"id": m.tool_call_id, "name": m.name or names.get(m.tool_call_id, ""),
                                                "response": {"output": output}}})
        elif m.content:
            parts.append({"text": m.content})
        for call in m.tool_calls:
            names[call.id] = call.name
            parts.append({"function_call": {"id": call.id, "name": call.name, "args": json.loads(call.arguments_json)}})
        role = "model" if m.role is Role.ASSISTANT else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return "\n\n".join(system), contents


def _usage(meta: Any) -> ProviderUsage | None:
    if meta is None or meta.prompt_token_count is None:
        return None
    return ProviderUsage(
        prompt_tokens=(meta.prompt_token_count or 0) + (meta.tool_use_prompt_token_count or 0),
        completion_tokens=(meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0),
        cached_prompt_tokens=meta.cached_content_token_count or 0,
    )


class GeminiProvider(Provider):
    kind = "gemini"

    def __init__(self, route: Route, *, timeout_s: float, connect_timeout_s: float, default_max_tokens: int,
                 transport: Any = None) -> None:
        self.route = route
        self._default_max_tokens = default_max_tokens
        self._key = route.api_key()
        self._http = sdk_http_client(connect_timeout_s, timeout_s, transport)
        options = types.HttpOptions(base_url=route.base_url, headers=route.headers or None,
                                    timeout=int(timeout_s * 1000), httpx_async_client=self._http)
        self.client = genai.Client(api_key=self._key or "missing", http_options=options)

    def _config(self, request: GenerateRequest, system: str) -> dict[str, Any]:
        s = request.sampling
        config: dict[str, Any] = {
            "max_output_tokens": s.max_tokens or self._default_max_tokens,
            "automatic_function_calling": {"disable": True},
        }
        if system:
            config["system_instruction"] = system
        for key, value in (("temperature", s.temperature), ("top_p", s.top_p), ("seed", s.seed)):
            if value is not None:
                config[key] = value
        if s.stop:
            config["stop_sequences"] = list(s.stop)
        if request.tools:
            config["tools"] = [{"function_declarations": [
                {"name": t.name, "description": t.description, "parameters_json_schema": t.parameters}
                for t in request.tools
            ]}]
            calling: dict[str, Any] = {"mode": MODES[request.effective_tool_choice]}
            if request.forced_tool:
                calling["allowed_function_names"] = [request.forced_tool]
            config["tool_config"] = {"function_calling_config": calling}
        if request.response_schema is not None:
            config["response_mime_type"] = "application/json"
            config["response_json_schema"] = request.response_schema
        return config

    def _args(self, request: GenerateRequest) -> dict[str, Any]:
        if self._key is None:
            raise ProviderError(AUTH, f"no API key: set {self.route.api_key_env or 'GEMINI_API_KEY'}")
        system, contents = to_gemini(request.messages)
        return {"model": request.model, "contents": contents, "config": self._config(request, system)}

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        args = self._args(request)
        usage, reason, called = None, FinishReason.UNSPECIFIED, False
        try:
            chunks = await self.client.aio.models.generate_content_stream(**args)
            async with contextlib.aclosing(chunks):  # releases the response when the caller stops early
                async for chunk in chunks:
                    for event in _events(chunk):
                        called = called or isinstance(event, ToolCallEvent)
                        yield event
                    usage = _usage(chunk.usage_metadata) or usage
                    reason = _reason(chunk) or reason
        except (genai_errors.APIError, httpx2.HTTPError) as exc:
            raise gemini_error(exc) from exc
        if called and reason is not FinishReason.LENGTH:
            reason = FinishReason.TOOL_CALLS
        yield Finish(reason, usage)

    async def generate(self, request: GenerateRequest) -> Completion:
        args = self._args(request)
        try:
            answer = await self.client.aio.models.generate_content(**args)
        except (genai_errors.APIError, httpx2.HTTPError) as exc:
            raise gemini_error(exc) from exc

        async def events() -> AsyncIterator[Event]:
            calls = False
            for event in _events(answer):
                calls = calls or isinstance(event, ToolCallEvent)
                yield event
            reason = _reason(answer) or FinishReason.STOP
            yield Finish(FinishReason.TOOL_CALLS if calls and reason is FinishReason.STOP else reason,
                         _usage(answer.usage_metadata))

        return await collect_events(events())

    async def count_tokens(self, messages: list[Message], tools: list[ToolDef]) -> TokenCount:
        """From the API's countTokens. The Gemini API counts contents only: a system instruction is
        counted as a leading user turn and tools are not counted, so such counts are marked estimated."""
        if self._key is None:
            raise ProviderError(AUTH, f"no API key: set {self.route.api_key_env or 'GEMINI_API_KEY'}")
        system, contents = to_gemini(messages)
        if system:
            contents = [{"role": "user", "parts": [{"text": system}]}, *contents]
        try:
            counted = await self.client.aio.models.count_tokens(model=self.route.provider_model, contents=contents)
        except (genai_errors.APIError, httpx2.HTTPError) as exc:
            raise gemini_error(exc) from exc
        return TokenCount(counted.total_tokens or 0, self.route.context_window or 0,
                          estimated=bool(system or tools))

    async def check(self) -> bool:
        if self._key is None:
            return False
        try:
            await self.client.aio.models.get(model=self.route.provider_model)
        except (genai_errors.APIError, httpx2.HTTPError):
            return False
        return True

    async def aclose(self) -> None:
        await self._http.aclose()


def _events(response: Any) -> list[Event]:
    out: list[Event] = []
    for candidate in (response.candidates or [])[:1]:
        content = candidate.content
        for part in (content.parts or []) if content else []:
            if part.function_call is not None:
                fc = part.function_call
                out.append(ToolCallEvent(ToolCall(fc.id or new_call_id(), fc.name or "",
                                                  json.dumps(fc.args or {}, ensure_ascii=False))))
            elif part.text and not part.thought:
                out.append(TextDelta(part.text))
    return out


def _reason(response: Any) -> FinishReason | None:
    for candidate in (response.candidates or [])[:1]:
        raw = candidate.finish_reason
        if raw is None:
            return None
        name = getattr(raw, "value", str(raw))
        if name == "STOP":
            return FinishReason.STOP
        if name == "MAX_TOKENS":
            return FinishReason.LENGTH
        if name in FILTERED:
            return FinishReason.CONTENT_FILTER
        return FinishReason.STOP
    return None
