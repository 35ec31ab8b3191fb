"""The inference service's Prometheus metrics (registered on the process registry, `ctx.metrics`)."""

from __future__ import annotations

from parley.runtime.metrics import LATENCY_BUCKETS, Metrics
from services.inference.domain import Response

TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


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

    def record(self, response: Response, streamed: bool) -> None:
        model, provider, usage = response.model, response.provider, response.usage
        self.tokens.labels(model, provider, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(model, provider, "completion").inc(usage.completion_tokens)
        if usage.cached_prompt_tokens:
            self.tokens.labels(model, provider, "cached_prompt").inc(usage.cached_prompt_tokens)
        if usage.cost.priced:
            self.cost.labels(model, provider).inc(usage.cost.usd)
        self.calls.labels(model, provider, str(usage.cost.priced).lower(), str(usage.estimated).lower()).inc()
        if streamed:
            self.ttft.labels(model, provider).observe(response.timing.time_to_first_token_ms / 1000)
            if response.timing.decode_tokens_per_second > 0:
                self.decode_tps.labels(model, provider).observe(response.timing.decode_tokens_per_second)
