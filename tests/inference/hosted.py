"""Helpers for the hosted-provider tests: a core over one route whose provider talks to a `Recorder`.

The Anthropic and Gemini adapters go through their SDKs, whose httpx2 transport the Recorder replaces
in-process. The OpenAI-compatible adapters (OpenAI, vLLM) speak HTTP themselves (aiohttp): for them the
Recorder is a real HTTP server on loopback, which writes each answer's body in small pieces so that the
stream decoder sees events split across reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Literal
from urllib.parse import urlsplit

import httpx2
from aiohttp import web

from parley.runtime.config import InferenceSettings
from parley.runtime.metrics import Metrics
from services.inference.app import build_core
from services.inference.core import InferenceCore
from services.inference.domain import GenerateRequest, Message, Role, Sampling
from services.inference.telemetry import InferenceMetrics

LOOPBACK_PROVIDERS = ("openai", "vllm")
PIECE = 7  # bytes per write of a loopback answer's body


class Recorder:
    """Records requests and answers each with `answer(request)` (httpx2 request and response objects), as an
    httpx2 MockTransport handler or as a loopback HTTP server (`serve`), which writes bodies `piece` bytes at a
    time (None: in one write; "event": one server-sent event per write, each a moment after the last, so that
    the client reads them apart: loopback merges quick writes into one read)."""

    def __init__(self, answer: Callable[[httpx2.Request], httpx2.Response],
                 piece: int | Literal["event"] | None = PIECE) -> None:
        self.answer = answer
        self.piece = piece
        self.requests: list[httpx2.Request] = []
        self._runner: web.AppRunner | None = None

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.content]

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self)

    async def serve(self) -> str:
        """Start answering on a free loopback port; returns the server's origin (http://127.0.0.1:PORT)."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        asked = httpx2.Request(request.method, str(request.url), headers=list(request.headers.items()),
                               content=await request.read(), extensions={"peer": peer})  # the client's socket
        answer = self(asked)
        await answer.aread()
        response = web.StreamResponse(status=answer.status_code, headers={
            k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "transfer-encoding")})
        await response.prepare(request)
        body = answer.content
        if self.piece == "event":
            for event in body.split(b"\n\n")[:-1]:
                await response.write(event + b"\n\n")
                await asyncio.sleep(0.005)
        else:
            size = self.piece or len(body) or 1
            for start in range(0, len(body), size):
                await response.write(body[start:start + size])
        await response.write_eof()
        return response


def sse(events: list[tuple[str | None, dict]]) -> httpx2.Response:
    """A `text/event-stream` response; `(name, data)` pairs, name None for data-only events."""
    text = "".join((f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n" for name, data in events)
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=text.encode())


async def core_with(route: dict, recorder: Recorder, metrics: Metrics | None = None, **overrides) -> InferenceCore:
    """A core with one hosted route (no local model) whose provider talks to `recorder`. For the
    OpenAI-compatible providers, the route's base URL keeps its path and gets the recorder's loopback origin.
    The `close_hosted` fixture closes the core's providers and the recorder's server after the test."""
    transports = {}
    if route["provider"] in LOOPBACK_PROVIDERS:
        route = {**route, "base_url": await recorder.serve() + urlsplit(route["base_url"]).path}
        CLEANUPS.append(recorder.close)
    else:
        transports[route["name"]] = recorder.transport()
    config = InferenceSettings(local_enabled=False, default_model=route["name"], routes=[route],
                               retry_initial_backoff_s=0.001, retry_max_backoff_s=0.01, **overrides)
    core, _ = await build_core(config, InferenceMetrics(metrics or Metrics()), transports=transports)
    CLEANUPS.extend(b.provider.aclose for b in core.backends.values())
    return core


CLEANUPS: list[Callable[[], Awaitable[None]]] = []  # what the running test's cores opened (see conftest)


def ask(model: str, *messages: Message, **kwargs) -> GenerateRequest:
    return GenerateRequest(model=model, messages=list(messages) or [Message(Role.USER, "Hello")],
                           sampling=Sampling(max_tokens=kwargs.pop("max_tokens", 64)), **kwargs)


async def streamed(core: InferenceCore, request: GenerateRequest) -> list:
    return [event async for event in core.stream(request)]
