"""Prometheus metrics of chat turns."""

from __future__ import annotations

import time
from contextlib import contextmanager

from parley.runtime.metrics import Metrics
from services.chat.events import TurnResult


class TurnMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.turns = metrics.counter("parley_chat_turns_total", "Chat turns, by model and outcome.", ["model", "outcome"])
        self.latency = metrics.histogram("parley_chat_turn_seconds", "Chat turn latency, by model.", ["model"])
        self.tokens = metrics.counter("parley_chat_tokens_total", "Tokens used by chat turns.", ["model", "kind"])
        self.cost = metrics.counter("parley_chat_cost_usd_total", "Cost of priced chat turns in USD.", ["model"])
        self.unpriced = metrics.counter("parley_chat_unpriced_turns_total", "Turns using an unpriced model.",
                                        ["model"])
        self.tool_calls = metrics.counter("parley_chat_tool_calls_total", "Tool calls made by the agent.",
                                          ["tool", "outcome"])
        self.cache = metrics.counter("parley_chat_cache_total", "Answer cache lookups.", ["result"])
        self.windows = metrics.counter(
            "parley_chat_window_cache_total",
            "Context windows of existing sessions: from the chat's cache (hit) or read from memory (miss).", ["result"])
        self.steps = metrics.histogram(
            "parley_chat_turn_step_seconds", "Time spent in each step of a chat turn.", ["step"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    @contextmanager
    def step(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps.labels(name).observe(time.perf_counter() - started)

    def turn(self, result: TurnResult) -> None:
        model = result.model or "unknown"
        outcome = "paused" if result.pending_approvals else ("cache_hit" if result.cache_hit else "answered")
        self.turns.labels(model, outcome).inc()
        self.latency.labels(model).observe(result.latency_ms / 1000)
        self.tokens.labels(model, "prompt").inc(result.usage.prompt_tokens)
        self.tokens.labels(model, "completion").inc(result.usage.completion_tokens)
        if result.usage.priced:
            self.cost.labels(model).inc(result.usage.cost_usd)
        else:
            self.unpriced.labels(model).inc()
        for record in result.tool_calls:
            self.tool_calls.labels(record.name, "error" if record.error else "ok").inc()
