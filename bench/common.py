"""Small helpers shared by the benchmark scripts: percentiles, timing, a result table, child processes."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(argv: list[str], env: dict[str, str | None] | None = None, log: str | None = None):
    """A child process, stopped (SIGTERM, then SIGKILL) on exit; its output goes to `log` or nowhere.
    `env` adds variables to ours (None: remove one)."""
    merged = {**os.environ, **(env or {})}
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=ROOT, env={k: v for k, v in merged.items() if v is not None},
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()


def cpu_seconds(pid: int, descendants: bool = True) -> float:
    """User + system CPU time of a process and (unless told not to) its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            if descendants:
                for task in Path(f"/proc/{current}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float) -> None:
    """Poll `ready` until it says yes; fail if `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the gRPC server at `address` answers SERVING to the standard health check."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING

        wait_until(serving, proc, f"SERVING from {address}", timeout)


def _machine_ticks() -> list[int]:
    """The machine's CPU ticks so far by kind: user, nice, system, idle, iowait, irq, softirq, steal, ... (Linux
    /proc/stat; empty elsewhere)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks of the whole machine so far (zeros where /proc/stat is missing)."""
    fields = _machine_ticks()
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy so far, all processes (user, nice, system, irq, softirq; 0
    where /proc/stat is missing)."""
    fields = _machine_ticks()
    if len(fields) < 7:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class StealMeter:
    """Share of the machine's CPU time the hypervisor gave to other guests (steal) since the meter was made.

    On a shared VM a high steal share means a run's latencies say more about the neighbours than about Parley;
    the benchmarks print it beside their figures."""

    def __init__(self) -> None:
        self._start = _cpu_ticks()

    def percent(self) -> float:
        steal, total = _cpu_ticks()
        spent = total - self._start[1]
        return 100.0 * (steal - self._start[0]) / spent if spent > 0 else 0.0
