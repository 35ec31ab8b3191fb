"""The inference service's Prometheus metrics (registered on the process registry, `ctx.metrics`)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

from parley.runtime.metrics import LATENCY_BUCKETS, Metrics
from services.inference.domain import Response

TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_BOOL = {False: "false", True: "true"}


class InferenceMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.tokens = metrics.counter(
            "parley_inference_tokens_total",
            "Tokens by model, provider and kind (prompt, completion, cached_prompt).",
            ["model", "provider", "kind"],
        )
        self.cost = metrics.counter(
            "parley_inference_cost_usd_total", "Cost of priced calls in US dollars.", ["model", "provider"]
        )
        self.calls = metrics.counter(
            "parley_inference_calls_total",
            "Calls by model, provider, whether priced and whether usage was estimated.",
            ["model", "provider", "priced", "estimated"],
        )
        self.errors = metrics.counter(
            "parley_inference_provider_errors_total",
            "Provider failures by model, provider and kind (connection, timeout, rate_limit, server, ...).",
            ["model", "provider", "kind"],
        )
        self.fallbacks = metrics.counter(
            "parley_inference_fallbacks_total", "Calls served by a fallback route.", ["requested", "served"]
        )
        self.cooldowns = metrics.counter(
            "parley_inference_cooldowns_total", "Cooldowns started, by provider endpoint.", ["endpoint"]
        )
        self.ttft = metrics.histogram(
            "parley_inference_time_to_first_token_seconds",
            "Time from request to first token, by model and provider.",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
        )
        self.decode_tps = metrics.histogram(
            "parley_inference_decode_tokens_per_second",
            "Completion tokens per second of decoding (streamed answers).",
            ["model", "provider"],
            buckets=TPS_BUCKETS,
        )
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}

    def record(self, response: Response, streamed: bool) -> None:
        model, provider, usage, timing = response.model, response.provider, response.usage, response.timing
        child = self._child
        child(self.tokens, model, provider, "prompt").inc(usage.prompt_tokens)
        child(self.tokens, model, provider, "completion").inc(usage.completion_tokens)
        if usage.cached_prompt_tokens:
            child(self.tokens, model, provider, "cached_prompt").inc(usage.cached_prompt_tokens)
        if usage.cost.priced:
            child(self.cost, model, provider).inc(usage.cost.usd)
        child(self.calls, model, provider, _BOOL[usage.cost.priced], _BOOL[usage.estimated]).inc()
        if streamed:
            child(self.ttft, model, provider).observe(timing.time_to_first_token_ms / 1000)
            if timing.decode_tokens_per_second > 0:
                child(self.decode_tps, model, provider).observe(timing.decode_tokens_per_second)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: the client's lookup (validation, a lock) is
        several times dearer than this dict, and a series still appears only when first used."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
