"""The inference domain core: routing, retries and fallbacks, usage accounting, cost, timing.

Unary and streamed calls share one path (`_serve`): per candidate route (the requested one, then its
fallbacks) a provider is tried with retries until it produces a first event; from then on the
stream belongs to that provider (a stream that already sent text cannot fall back without
duplicating it). Unary calls of providers with a unary API use it; the local model always streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from parley.runtime.config import InferenceSettings
from parley.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ParleyError,
    ResourceExhausted,
    Unavailable,
)
from parley.runtime.logging import get_logger
from services.inference.domain import (
    Event,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    ModelInfo,
    Pricing,
    Response,
    TextDelta,
    Timing,
    TokenCount,
    ToolCall,
    ToolCallEvent,
    ToolDef,
    Usage,
)
from services.inference.pricing import FREE, PriceTable, compute_cost
from services.inference.providers.base import AUTH, BAD_REQUEST, RATE_LIMIT, Provider, ProviderError
from services.inference.resilience import Cooldowns, RetryPolicy
from services.inference.routes import Route
from services.inference.telemetry import InferenceMetrics
from services.inference.tokens import UsageEstimator
from services.inference.validate import Problems, validate_max_tokens, validate_messages, validate_request

_log = get_logger(__name__)
CHECK_TIMEOUT_S = 3.0


@dataclass
class Backend:
    """A route with its adapter and what the core needs to account for it."""

    route: Route
    provider: Provider
    estimator: UsageEstimator
    context_window: int | None
    unary_native: bool  # the provider has a unary API (else unary calls collect a stream)


class InferenceCore:
    def __init__(self, settings: InferenceSettings, backends: dict[str, Backend], prices: PriceTable,
                 metrics: InferenceMetrics) -> None:
        self.settings = settings
        self.backends = backends
        self.prices = prices
        self.metrics = metrics
        self.cooldowns = Cooldowns(settings.cooldown_failures, settings.cooldown_s)
        self.retry = RetryPolicy(settings.retry_initial_backoff_s, settings.retry_max_backoff_s)
        self._reachable: dict[str, tuple[bool, float]] = {}
        self._prices = {name: self._price_of(b.route) for name, b in backends.items()}  # the table is fixed

    # -- routing ------------------------------------------------------------------------------------
    def resolve(self, model: str) -> Backend:
        name = model or self.settings.default_model
        backend = self.backends.get(name)
        if backend is None:
            available = ", ".join(sorted(self.backends))
            raise NotFound(message=f"model {name[:128]!r} is not configured; available models: {available}",
                           reason="MODEL_NOT_FOUND", metadata={"model": name[:128], "available": available})
        return backend

    def _candidates(self, first: Backend) -> tuple[list[Backend], list[str]]:
        """The chain to try, and the routes skipped because their endpoint is cooling down."""
        chain = [first, *(self.backends[name] for name in first.route.fallbacks)]
        ready = [b for b in chain if not self.cooldowns.cooling(b.route.endpoint())]
        skipped = [b.route.name for b in chain if b not in ready]
        return (ready, skipped) if ready else (chain, [])  # all cooling: try anyway

    def pricing(self, route: Route) -> Pricing | None:
        """The route's price; the local model is free (a price of 0, not a missing price)."""
        return self._prices[route.name]

    def _price_of(self, route: Route) -> Pricing | None:
        found = self.prices.price(route.name, route.provider_model)
        return FREE if found is None and route.provider == "local" else found

    # -- calls --------------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> Response:
        final = None
        async for item in self._serve(request, streaming=False):
            final = item
        assert isinstance(final, Response)
        return final

    def stream(self, request: GenerateRequest) -> AsyncIterator[TextDelta | ToolCallEvent | Response]:
        return coalesce(self._serve(request, streaming=True))

    async def _serve(self, request: GenerateRequest, *, streaming: bool) -> AsyncIterator:
        backend = self.resolve(request.model)
        validate_request(request, max_chars=self.settings.max_request_chars)
        validate_max_tokens(request, backend.route.name, backend.context_window, backend.route.max_output_tokens)
        started = time.perf_counter()
        candidates, tried = self._candidates(backend)
        failures: list[tuple[str, ProviderError]] = []
        for candidate in candidates:
            routed = dataclasses.replace(request, model=candidate.route.provider_model)
            try:
                events, first = await self._open(candidate, routed, streaming)
            except ProviderError as exc:
                self._failed(candidate, exc)
                failures.append((candidate.route.name, exc))
                tried.append(candidate.route.name)
                if exc.kind == BAD_REQUEST:
                    break  # the request is wrong: another model would not make it right
                continue
            if tried:
                self.metrics.fallbacks.labels(backend.route.name, candidate.route.name).inc()
            async for item in self._relay(candidate, routed, events, first, started, tried, streaming):
                yield item
            return
        raise self._final_error(backend.route.name, failures)

    async def _open(self, backend: Backend, request: GenerateRequest, streaming: bool):
        """Start a call with retries; returns the event iterator and its first event."""
        route = backend.route

        async def attempt():
            if streaming or not backend.unary_native:
                events = aiter(backend.provider.stream(request))
            else:
                events = _completion_events(backend.provider, request)
            try:
                return events, await anext(events)
            except BaseException:
                await events.aclose()
                raise

        retries = self.settings.max_retries if route.max_retries is None else route.max_retries
        timeout = None if route.provider == "local" else (route.timeout_s or self.settings.provider_timeout_s)
        return await self.retry.run(attempt, retries=retries, timeout_s=timeout)

    async def _relay(self, backend: Backend, request: GenerateRequest, events: AsyncIterator[Event], event: Event,
                     started: float, tried: list[str], streaming: bool) -> AsyncIterator:
        parts: list[str] = []
        calls: list[ToolCall] = []
        first_at = None
        try:
            while True:
                if isinstance(event, Finish):
                    break
                if first_at is None:
                    first_at = time.perf_counter()
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                else:
                    calls.append(event.call)
                if streaming:
                    yield event
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    event = Finish(FinishReason.UNSPECIFIED)
                except ProviderError as exc:
                    self._failed(backend, exc)
                    raise Unavailable(message=f"{backend.route.name} failed during the answer: {exc}",
                                      reason="PROVIDER_FAILED_MID_STREAM",
                                      metadata={"model": backend.route.name}) from exc
        finally:
            await events.aclose()
        self.cooldowns.success(backend.route.endpoint())
        self._reachable[backend.route.name] = (True, time.monotonic())
        ended = time.perf_counter()
        text = "".join(parts)
        observed = streaming or not backend.unary_native
        response = self._respond(backend, request, text, calls, event, started, first_at, ended, tried, observed)
        self.metrics.record(response, streamed=observed)
        yield response

    def _respond(self, backend: Backend, request: GenerateRequest, text: str, calls: list[ToolCall], finish: Finish,
                 started: float, first_at: float | None, ended: float, tried: list[str], observed: bool) -> Response:
        route = backend.route
        reported = finish.usage
        if reported is None or reported.prompt_tokens == 0 or (reported.completion_tokens == 0 and (text or calls)):
            reported = backend.estimator.usage(request.messages, request.tools, text, calls, reported)
        cost = compute_cost(self.pricing(route), reported)
        usage = Usage(reported.prompt_tokens, reported.completion_tokens, reported.cached_prompt_tokens,
                      reported.estimated, cost)
        first = min(x for x in (first_at, finish.first_token_at, ended) if x is not None)
        decode_s = ended - first
        # Decode speed is only measured where tokens were seen as they came (streams, the local model).
        tps = (usage.completion_tokens - 1) / decode_s if usage.completion_tokens > 1 and decode_s > 0 else 0.0
        timing = Timing((first - started) * 1000, (ended - started) * 1000, tps if observed else 0.0)
        return Response(route.name, route.provider, text, calls, finish.reason, usage, timing, list(tried))

    def _failed(self, backend: Backend, exc: ProviderError) -> None:
        route = backend.route
        self.metrics.errors.labels(route.name, route.provider, exc.kind).inc()
        _log.warning("provider_failed", model=route.name, provider=route.provider, error=str(exc))
        if exc.kind == BAD_REQUEST:
            return
        self._reachable[route.name] = (False, time.monotonic())
        if self.cooldowns.failure(route.endpoint()):
            self.metrics.cooldowns.labels(route.endpoint()).inc()
            _log.warning("provider_cooldown", endpoint=route.endpoint(), seconds=self.settings.cooldown_s)

    @staticmethod
    def _final_error(model: str, failures: list[tuple[str, ProviderError]]) -> ParleyError:
        summary = "; ".join(f"{name}: {exc}" for name, exc in failures)
        kinds = {exc.kind for _, exc in failures}
        meta = {"model": model, "tried": ",".join(name for name, _ in failures)}
        name, last = failures[-1]
        if last.kind == BAD_REQUEST:
            return InvalidArgument(message=f"{name} rejected the request: {last.message}",
                                   reason="PROVIDER_REJECTED_REQUEST", metadata=meta)
        if kinds == {RATE_LIMIT}:
            waits = [exc.retry_after_s for _, exc in failures if exc.retry_after_s]
            return ResourceExhausted(message=f"rate limited: {summary}", reason="PROVIDER_RATE_LIMITED",
                                     retry_after_s=min(waits) if waits else None, metadata=meta)
        if kinds == {AUTH}:
            return FailedPrecondition(message=f"provider credentials were refused or missing: {summary}",
                                      reason="PROVIDER_AUTH", metadata=meta)
        return Unavailable(message=f"no provider could serve {model}: {summary}", reason="PROVIDERS_FAILED",
                           metadata=meta)

    # -- tokens and models --------------------------------------------------------------------------
    async def count_tokens(self, model: str, messages: list[Message], tools: list[ToolDef] | None = None) -> TokenCount:
        backend = self.resolve(model)
        problems = Problems()
        validate_messages(messages, problems)
        problems.raise_if_any()
        try:
            counted = await backend.provider.count_tokens(messages, tools or [])
        except ProviderError as exc:
            self._failed(backend, exc)
            raise self._final_error(backend.route.name, [(backend.route.name, exc)]) from exc
        if not counted.context_window and backend.context_window:
            counted.context_window = backend.context_window
        return counted

    async def list_models(self) -> list[ModelInfo]:
        await self._refresh_reachability()
        models = []
        for name, backend in self.backends.items():
            route = backend.route
            pricing = self.pricing(route)
            models.append(ModelInfo(
                name=name, provider=route.provider, provider_model=route.provider_model,
                context_window=backend.context_window or 0, reachable=self._reachable.get(name, (False, 0.0))[0],
                pricing=pricing, native_tool_calling=backend.provider.native_tools,
                is_default=name == self.settings.default_model, fallbacks=list(route.fallbacks),
            ))
        return models

    async def _refresh_reachability(self) -> None:
        now = time.monotonic()
        stale = [b for name, b in self.backends.items()
                 if now - self._reachable.get(name, (False, -1e9))[1] >= self.settings.health_ttl_s]

        async def check(backend: Backend) -> None:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    ok = await backend.provider.check()
            except (TimeoutError, ProviderError):
                ok = False
            self._reachable[backend.route.name] = (ok, time.monotonic())

        await asyncio.gather(*(check(b) for b in stale))


async def _completion_events(provider: Provider, request: GenerateRequest) -> AsyncIterator[Event]:
    """A unary answer as events, so both paths share the accounting."""
    answer = await provider.generate(request)
    if answer.text:
        yield TextDelta(answer.text)
    for call in answer.tool_calls:
        yield ToolCallEvent(call)
    yield answer.finish


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def coalesce(events: AsyncIterator) -> AsyncIterator:
    """Text deltas that are ready together leave together: fewer, larger messages, none of them later.

    A pump task reads `events` as fast as they come; the consumer takes the first one waiting and merges
    the text deltas queued right behind it. A source that produces token by token still streams token
    by token; a burst (a provider sending many chunks per network read, or a slow client) costs one
    message instead of many.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async for item in events:
                queue.put_nowait(item)
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait(_Raised(exc))
        else:
            queue.put_nowait(done)

    task = asyncio.create_task(pump())
    pending = None
    try:
        while True:
            item, pending = (pending if pending is not None else await queue.get()), None
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.exc
            if isinstance(item, TextDelta) and not queue.empty():
                texts = [item.text]
                while not queue.empty():
                    following = queue.get_nowait()
                    if not isinstance(following, TextDelta):
                        pending = following
                        break
                    texts.append(following.text)
                item = TextDelta("".join(texts))
            yield item
    finally:
        if not task.done():  # the consumer stopped early: stop reading the provider (a finished pump needs nothing)
            task.cancel()
            await asyncio.wait([task])
