"""Proxy overhead of Parley's inference service vs LiteLLM's proxy, side by side in one run.

One instant OpenAI-compatible upstream (`bench.inference.upstream`, its own process) answers every
path the same streamed completion. A client process streams chat completions:
  (a) directly from the upstream, two baselines: with the `openai` SDK ("direct") and with the leanest
      client there is here, aiohttp and a bare event-stream decoder ("direct-raw"),
  (b) through Parley's inference service over gRPC (`parley serve inference`, its own process),
  (c) through LiteLLM's proxy (`litellm[proxy]`, its own process and venv: bench/inference/.venv-litellm),
  and through the floor (`bench.inference.floor`, its own process): the least a Python gRPC service pays
  to relay the stream, a yardstick for what any proxy of Parley's architecture adds on this machine,
at 1, 16 and 64 concurrent streams. Added latency = a path's percentile minus a baseline's.

    .venv/bin/pip install -e '.[bench]'    # the `openai` SDK, the direct path's client
    .venv/bin/python -m bench.inference.proxy_overhead [--seconds 8] [--tokens 8] [--log-level INFO]

LiteLLM runs from its own venv (never Parley's dependencies); create it first:
    python3.11 -m venv bench/inference/.venv-litellm
    bench/inference/.venv-litellm/bin/pip install 'litellm[proxy]'   # 1.106.2 measured (1.109.1 needs a newer certifi)
Not a test: it prints figures (docs/inference.md records a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import grpc
import httpx2
import openai

from bench.common import pct, table
from bench.inference import procs
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc
from services.inference.providers.openai_compat import sse_data

MESSAGES = [{"role": "user", "content": "Say something."}]
LEVELS = (1, 16, 64)


Client = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]  # one request, then closing the client


def openai_path(base_url: str) -> Client:
    """A streamed chat completion with the `openai` SDK. Its generic `post` keeps chunks as plain dicts:
    the leanest client the SDK offers, so the baseline is fast and the added latencies are conservative."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, http_client=httpx2.AsyncClient(
        limits=httpx2.Limits(max_connections=512, max_keepalive_connections=512), timeout=30))
    body = {"model": "instant", "messages": MESSAGES, "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}}

    async def one() -> None:
        stream = await client.post("/chat/completions", body=body, cast_to=object, stream=True,
                                   stream_cls=openai.AsyncStream[object])
        last = None
        async for chunk in stream:
            last = chunk
        assert last is not None and last.get("usage"), last

    return one, client.close


def raw_path(base_url: str) -> Client:
    """The same streamed completion with the leanest client there is here: aiohttp and the event-stream decoder
    of Parley's own adapter, each chunk parsed as JSON. The second baseline: what a client pays at the least."""
    body = json.dumps({"model": "instant", "messages": MESSAGES, "max_tokens": 16, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer none"}
    sessions: list[aiohttp.ClientSession] = []  # made on first use, on the benchmark's loop

    async def one() -> None:
        if not sessions:
            sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)))
        last = None
        async with sessions[0].post(f"{base_url}/chat/completions", data=body, headers=headers) as response:
            async for data in sse_data(response.content.iter_any()):
                if data.startswith("[DONE]"):
                    break
                last = json.loads(data)
        assert last is not None and last.get("usage"), last

    async def close() -> None:
        for session in sessions:
            await session.close()

    return one, close


def parley_path(address: str) -> Client:
    channel = grpc.aio.insecure_channel(address)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = pb.StreamGenerateRequest(model="instant", sampling=pb.SamplingParams(max_tokens=16),
                                       messages=[pb.Message(role=pb.ROLE_USER, content="Say something.")])

    async def one() -> None:
        final = None
        async for event in stub.StreamGenerate(request, timeout=30):
            final = event
        assert final is not None and final.WhichOneof("event") == "final"

    return one, channel.close


ERRORS: dict[str, int] = {}


async def load(one: Callable[[], Awaitable[None]], concurrency: int, seconds: float,
               label: str = "") -> tuple[list[float], float]:
    """Latencies (ms) of complete streams with `concurrency` streams always open, and requests/s.
    Failed requests are counted in ERRORS[label], not timed."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await one()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ERRORS[label] = ERRORS.get(label, 0) + 1
                if ERRORS[label] == 1:
                    print(f"first error on {label}: {type(exc).__name__}: {exc}")
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, len(latencies) / (time.perf_counter() - started)


async def run(targets: dict[str, tuple[str, str]], pids: dict[str, int], seconds: float) -> dict:
    """`targets`: path name -> (kind, address); clients are made here, on the benchmark's loop.
    `pids`: the proxy process of a path, whose CPU time per request is measured too."""
    makers = {"openai": openai_path, "raw": raw_path, "grpc": parley_path}
    clients = {name: makers[kind](address) for name, (kind, address) in targets.items()}
    paths = {name: one for name, (one, _close) in clients.items()}
    try:
        for one in paths.values():  # warm connections, caches and JITs
            await load(one, 8, 1.0)
        results: dict[tuple[str, int], tuple[list[float], float, float]] = {}
        for concurrency in LEVELS:
            for name, one in paths.items():  # interleaved: every path sees the same machine state
                cpu = procs.cpu_seconds(pids[name]) if name in pids else 0.0
                latencies, rps = await load(one, concurrency, seconds, f"{name}@{concurrency}")
                cpu_ms = (procs.cpu_seconds(pids[name]) - cpu) * 1000 / max(len(latencies), 1) if name in pids else 0.0
                results[(name, concurrency)] = (latencies, rps, cpu_ms)
        return results
    finally:
        for _one, close in clients.values():
            await close()


BASELINES = ("direct", "direct-raw")


def report(results: dict, names: list[str]) -> None:
    rows = []
    for concurrency in LEVELS:
        sdk, raw = (results[(b, concurrency)][0] for b in BASELINES)
        for name in names:
            lat, rps, cpu_ms = results[(name, concurrency)]
            p50, p99 = pct(lat, 50), pct(lat, 99)
            if name in BASELINES:
                added = added_raw = "(baseline)"
            else:
                added = f"{p50 - pct(sdk, 50):+.2f} / {p99 - pct(sdk, 99):+.2f}"
                added_raw = f"{p50 - pct(raw, 50):+.2f} / {p99 - pct(raw, 99):+.2f}"
            cpu = "-" if name in BASELINES else f"{cpu_ms:.2f}"
            rows.append((str(concurrency), name, f"{p50:.2f}", f"{p99:.2f}", added, added_raw, cpu, f"{rps:.0f}",
                         str(len(lat))))
    print(table(rows, ("streams", "path", "p50 ms", "p99 ms", "added p50 / p99 ms (vs SDK)",
                       "added p50 / p99 ms (vs raw)", "proxy CPU ms/req", "req/s", "n")))
    print("baselines: direct = the openai SDK's client; direct-raw = aiohttp and a bare event-stream decoder")
    print()
    print("max requests/s: " + ", ".join(
        f"{name} {max(results[(name, c)][1] for c in LEVELS):.0f}" for name in names))
    print("proxy CPU ms/req: CPU time the proxy process spent per request (robust to other load on the machine)")
    print(f"failed requests: {ERRORS or 'none'}")
    if "floor" in names:
        print("Parley against the floor (the least a Python gRPC relay pays here), p50 / p99 ms and proxy CPU:")
        for concurrency in LEVELS:
            raw, floor, parley = (results[(n, concurrency)] for n in ("direct-raw", "floor", "parley"))
            print(f"{concurrency:>2} streams  vs raw: floor adds {pct(floor[0], 50) - pct(raw[0], 50):+.2f} / "
                  f"{pct(floor[0], 99) - pct(raw[0], 99):+.2f}, Parley {pct(parley[0], 50) - pct(raw[0], 50):+.2f} / "
                  f"{pct(parley[0], 99) - pct(raw[0], 99):+.2f}; Parley over the floor "
                  f"{pct(parley[0], 50) - pct(floor[0], 50):+.2f} / {pct(parley[0], 99) - pct(floor[0], 99):+.2f}; "
                  f"CPU/request {parley[2]:.2f} vs {floor[2]:.2f} ms ({parley[2] / max(floor[2], 1e-9):.2f}x)")
    if "litellm" in names:
        print("added latency against the raw client (the stricter baseline):")
        for concurrency in LEVELS:
            base = results[("direct-raw", concurrency)][0]
            cpu_ratio = results[("litellm", concurrency)][2] / max(results[("parley", concurrency)][2], 1e-9)
            ratios = [f"CPU/request {cpu_ratio:.1f}x"]
            for q in (50, 99):
                parley_added = pct(results[("parley", concurrency)][0], q) - pct(base, q)
                litellm_added = pct(results[("litellm", concurrency)][0], q) - pct(base, q)
                ratio = litellm_added / parley_added if parley_added > 0 else float("inf")
                ratios.append(f"p{q}: LiteLLM adds {litellm_added:.2f} ms, Parley {parley_added:.2f} ms ({ratio:.1f}x)")
            print(f"{concurrency:>2} streams  " + "; ".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description="Proxy overhead: direct vs Parley vs LiteLLM")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each (path, concurrency) run")
    parser.add_argument("--tokens", type=int, default=8, help="text chunks the upstream streams")
    parser.add_argument("--log-level", default="INFO", help="Parley's log level (INFO: one line per RPC, the default)")
    parser.add_argument("--no-litellm", action="store_true")
    args = parser.parse_args()

    up_port, parley_port, litellm_port, floor_port = (procs.free_port() for _ in range(4))
    upstream_base = f"http://127.0.0.1:{up_port}/v1"
    routes = [{"name": "instant", "provider": "openai", "base_url": upstream_base, "max_retries": 0}]
    why_not = "--no-litellm" if args.no_litellm else procs.litellm_available()
    logs = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    with ExitStack() as stack:
        up = stack.enter_context(procs.upstream(up_port, args.tokens))
        procs.wait_http(f"{upstream_base}/models", up)
        server = stack.enter_context(procs.parley(parley_port, routes, local=False, log_level=args.log_level,
                                                  log=str(logs / "parley.log")))
        procs.wait_serving(f"127.0.0.1:{parley_port}", server)
        floor = stack.enter_context(procs.floor(floor_port, upstream_base, log=str(logs / "floor.log")))
        procs.wait_serving(f"127.0.0.1:{floor_port}", floor)
        paths = {"direct": ("openai", upstream_base), "direct-raw": ("raw", upstream_base),
                 "floor": ("grpc", f"127.0.0.1:{floor_port}"), "parley": ("grpc", f"127.0.0.1:{parley_port}")}
        pids = {"parley": server.pid, "floor": floor.pid}
        if why_not is None:
            proxy = stack.enter_context(procs.litellm(litellm_port, upstream_base, logs / "litellm.yaml",
                                                      log=str(logs / "litellm.log")))
            procs.wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", proxy, timeout=180)
            paths["litellm"] = ("openai", f"http://127.0.0.1:{litellm_port}/v1")
            pids["litellm"] = proxy.pid
        print(f"machine: {os.cpu_count()} cores; upstream streams {args.tokens} chunks + usage; "
              f"{args.seconds:g} s per run; Parley log level {args.log_level}; logs in {logs}")
        if why_not is not None:
            print(f"LiteLLM not measured: {why_not}")
        results = asyncio.run(run(paths, pids, args.seconds))
        report(results, list(paths))


if __name__ == "__main__":
    main()
