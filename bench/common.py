"""Small helpers shared by the benchmark scripts: percentiles, timing, a result table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    """Milliseconds one awaited call takes."""
    started = time.perf_counter()
    await fn()
    return (time.perf_counter() - started) * 1000


def summary_ms(samples: list[float]) -> str:
    return f"p50 {pct(samples, 50):.2f} ms, p95 {pct(samples, 95):.2f} ms, p99 {pct(samples, 99):.2f} ms, " \
           f"mean {statistics.fmean(samples):.2f} ms (n={len(samples)})"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
