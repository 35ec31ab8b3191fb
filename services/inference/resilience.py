"""Retries (tenacity: exponential backoff with jitter, retryable errors only, Retry-After honoured),
per-attempt timeouts, and cooldowns of failing provider endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from services.inference.providers.base import TIMEOUT, ProviderError

T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


_RETRY = retry_if_exception(_retryable)


class _Backoff:
    """Exponential backoff with jitter, but never shorter than the provider's Retry-After."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._jittered = wait_exponential_jitter(initial=initial, max=maximum, jitter=initial)
        self._maximum = maximum

    def __call__(self, state: RetryCallState) -> float:
        delay = self._jittered(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after_s:
            delay = max(delay, min(exc.retry_after_s, self._maximum))
        return delay


class RetryPolicy:
    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._wait = _Backoff(initial_s, maximum_s)

    async def run(self, attempt: Callable[[], Awaitable[T]], *, retries: int, timeout_s: float | None) -> T:
        """`attempt()` until it succeeds, fails for good, or `retries` retries are spent.

        Each try gets `timeout_s`; running out of it is a retryable TIMEOUT. Only retryable
        `ProviderError`s are retried; anything else propagates at once.

        The first try runs bare: nearly every call succeeds there, and tenacity's bookkeeping costs ~25 µs a
        call. After a retryable failure tenacity takes over, that failure replayed as its first attempt, so the
        stop, the backoff schedule and Retry-After apply exactly as if tenacity had made it.
        """
        try:
            return await _timed(attempt, timeout_s)
        except ProviderError as exc:
            if not exc.retryable or retries == 0:
                raise
            first: ProviderError | None = exc

        async def again() -> T:
            nonlocal first
            if first is not None:
                failed, first = first, None
                raise failed
            return await _timed(attempt, timeout_s)

        retrying = AsyncRetrying(stop=stop_after_attempt(retries + 1), wait=self._wait, retry=_RETRY, reraise=True)
        return await retrying(again)


async def _timed(attempt: Callable[[], Awaitable[T]], timeout_s: float | None) -> T:
    if timeout_s is None:
        return await attempt()
    try:
        async with asyncio.timeout(timeout_s):
            return await attempt()
    except TimeoutError:
        raise ProviderError(TIMEOUT, f"no answer within {timeout_s:g} s") from None


class Cooldowns:
    """After `failures` consecutive failures an endpoint is skipped for `seconds`."""

    def __init__(self, failures: int, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit, self._seconds, self._clock = failures, seconds, clock
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def cooling(self, endpoint: str) -> bool:
        until = self._until.get(endpoint)
        if until is None:
            return False
        if self._clock() >= until:
            del self._until[endpoint]  # half-open: the next call tries it again
            return False
        return True

    def failure(self, endpoint: str) -> bool:
        """Record a failure; True when it starts a cooldown."""
        count = self._failures.get(endpoint, 0) + 1
        self._failures[endpoint] = count
        if self._seconds > 0 and count >= self._limit:
            self._until[endpoint] = self._clock() + self._seconds
            self._failures[endpoint] = 0
            return True
        return False

    def success(self, endpoint: str) -> None:
        if self._failures.get(endpoint):
            self._failures[endpoint] = 0
