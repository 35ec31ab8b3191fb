"""Helpers for the hosted-provider tests: a core over routes whose SDK HTTP transport answers in-process."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx2

from parley.runtime.config import InferenceSettings
from parley.runtime.metrics import Metrics
from services.inference.app import build_core
from services.inference.core import InferenceCore
from services.inference.domain import GenerateRequest, Message, Role, Sampling
from services.inference.telemetry import InferenceMetrics


class Recorder:
    """An httpx2 MockTransport handler that records requests and answers with `answer(request)`."""

    def __init__(self, answer: Callable[[httpx2.Request], httpx2.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.content]

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self)


def sse(events: list[tuple[str | None, dict]]) -> httpx2.Response:
    """A `text/event-stream` response; `(name, data)` pairs, name None for data-only events."""
    text = "".join((f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n" for name, data in events)
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=text.encode())


async def core_with(route: dict, recorder: Recorder, metrics: Metrics | None = None, **overrides) -> InferenceCore:
    """A core with one hosted route (no local model) whose SDK talks to `recorder`."""
    config = InferenceSettings(local_enabled=False, default_model=route["name"], routes=[route],
                               retry_initial_backoff_s=0.001, retry_max_backoff_s=0.01, **overrides)
    core, _ = await build_core(config, InferenceMetrics(metrics or Metrics()),
                               transports={route["name"]: recorder.transport()})
    return core


def ask(model: str, *messages: Message, **kwargs) -> GenerateRequest:
    return GenerateRequest(model=model, messages=list(messages) or [Message(Role.USER, "Hello")],
                           sampling=Sampling(max_tokens=kwargs.pop("max_tokens", 64)), **kwargs)


async def streamed(core: InferenceCore, request: GenerateRequest) -> list:
    return [event async for event in core.stream(request)]
