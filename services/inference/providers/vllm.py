"""vLLM: its OpenAI-compatible server plus what vLLM adds.

- exact prompt counts from its tokenizer endpoint, `POST /tokenize` with chat messages
  (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html#tokenizer-api), which also
  reports the served context window (`max_model_len`);
- tool calls that must happen (REQUIRED, or one `forced_tool`) are decoded under a JSON schema
  (`structured_outputs: {"json": ...}`, or `guided_json` before vLLM 0.10.2, in the request's extra
  body: https://docs.vllm.ai/en/latest/features/structured_outputs.html), so their arguments always
  parse and match the schema, whatever tool parser the server was started with;
- its Prometheus metrics (`GET /metrics`): running and waiting requests and KV-cache use, read at
  each reachability check and exported as `parley_inference_vllm_*` gauges.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from services.inference.domain import (
    Completion,
    Event,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    TextDelta,
    TokenCount,
    ToolCallEvent,
    ToolChoice,
    ToolDef,
)
from services.inference.providers.base import CONNECTION, OTHER, ProviderError, kind_for_status
from services.inference.providers.openai_compat import OpenAIProvider, to_openai_messages, to_openai_tools
from services.inference.providers.toolcalls import call_schema, parse_call, with_tools_prompt

# vLLM metric -> (Parley gauge suffix, help). kv_cache_usage_perc replaced gpu_cache_usage_perc in vLLM 0.10.
VLLM_GAUGES = {
    "vllm:num_requests_running": ("requests_running", "Requests vLLM is decoding."),
    "vllm:num_requests_waiting": ("requests_waiting", "Requests queued in vLLM."),
    "vllm:kv_cache_usage_perc": ("kv_cache_usage", "Fraction of vLLM's KV cache in use (0-1)."),
    "vllm:gpu_cache_usage_perc": ("kv_cache_usage", "Fraction of vLLM's KV cache in use (0-1)."),
}


class VLLMProvider(OpenAIProvider):
    kind = "vllm"

    def __init__(self, route, **kwargs: Any) -> None:
        super().__init__(route, **kwargs)
        self._root = str(route.base_url).rstrip("/").removesuffix("/v1")
        self.gauges: dict[str, float] = {}
        self.gauges_at = 0.0

    # -- guided tool calls ------------------------------------------------------------------------
    def _guided(self, request: GenerateRequest) -> tuple[GenerateRequest, dict[str, Any]]:
        schema = call_schema(request.tools, request.forced_tool)
        field = self.route.guided_decoding
        extra = {"structured_outputs": {"json": schema}} if field == "structured_outputs" else {"guided_json": schema}
        return dataclasses.replace(
            request, messages=with_tools_prompt(request.messages, request.tools, request.forced_tool),
            tools=[], tool_choice=None, forced_tool="", response_schema=None,
        ), extra

    def body(self, request: GenerateRequest, *, stream: bool) -> dict[str, Any]:
        if request.effective_tool_choice is not ToolChoice.REQUIRED:
            return super().body(request, stream=stream)
        plain, extra = self._guided(request)
        body = super().body(plain, stream=stream)
        body.update(extra)
        return body

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        if request.effective_tool_choice is not ToolChoice.REQUIRED:
            async for event in super().stream(request):
                yield event
            return
        parts: list[str] = []
        async for event in super().stream(request):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finish):
                yield ToolCallEvent(_call("".join(parts), event.reason))
                yield Finish(FinishReason.TOOL_CALLS, event.usage)

    async def generate(self, request: GenerateRequest) -> Completion:
        answer = await super().generate(request)
        if request.effective_tool_choice is not ToolChoice.REQUIRED:
            return answer
        call = _call(answer.text, answer.finish.reason)
        return Completion("", [call], Finish(FinishReason.TOOL_CALLS, answer.finish.usage))

    # -- vLLM's own endpoints ---------------------------------------------------------------------
    async def count_tokens(self, messages: list[Message], tools: list[ToolDef]) -> TokenCount:
        body: dict[str, Any] = {"model": self.route.provider_model, "messages": to_openai_messages(messages),
                                "add_generation_prompt": True}
        if tools:
            body["tools"] = to_openai_tools(tools)
        data = await self._get_json("POST", "/tokenize", body)
        window = int(data.get("max_model_len") or self.route.context_window or 0)
        return TokenCount(int(data["count"]), window, estimated=False)

    async def check(self) -> bool:
        try:
            async with self._http.get().get(f"{self._root}/metrics", headers=self._auth(), proxy=self._proxy,
                                            timeout=aiohttp.ClientTimeout(total=5.0)) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return False
        if status != 200:
            return await super().check()
        gauges: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in VLLM_GAUGES:
                    key = VLLM_GAUGES[sample.name][0]
                    gauges[key] = gauges.get(key, 0.0) + float(sample.value)  # summed over the served models
        self.gauges, self.gauges_at = gauges, time.time()
        return True

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    async def _get_json(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self._http.get().request(method, self._root + path, json=body, headers=self._auth(),
                                                proxy=self._proxy) as response:
                status, raw = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(CONNECTION, f"cannot reach vLLM at {self._root}: {exc}") from exc
        if status != 200:
            raise ProviderError(kind_for_status(status), raw[:500].decode(errors="replace"), status)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ProviderError(OTHER, f"vLLM's {path} answer is not JSON: {exc}") from exc


def _call(text: str, reason: FinishReason):
    try:
        return parse_call(text)
    except ValueError:
        raise ProviderError(
            OTHER, f"vLLM stopped ({reason}) before the guided tool call was complete: {text[:200]!r}"
        ) from None


def vllm_collector(providers: list[VLLMProvider]):
    """A Prometheus collector exporting the last vLLM metrics read from each vLLM route."""

    class _Collector:
        def collect(self):
            families: dict[str, GaugeMetricFamily] = {}
            for provider in providers:
                for key, value in provider.gauges.items():
                    help_text = next(h for k, h in VLLM_GAUGES.values() if k == key)
                    family = families.setdefault(
                        key, GaugeMetricFamily(f"parley_inference_vllm_{key}", help_text, labels=["model"])
                    )
                    family.add_metric([provider.route.name], value)
            yield from families.values()

        def describe(self):
            return []

    return _Collector()
