"""Chat turn overhead: everything in a turn except the model's own decoding.

The stack runs as `parley up` does, in a process of its own (all four services on uvloop, the embedded
PostgreSQL+pgvector and Redis, the real embedding model), configured through the environment, against an
instant OpenAI-compatible upstream model (bench/inference/upstream.py, a process answering at once).
This process is the load: sessions that call the chat service's `Chat` over gRPC, each sending turns one
after another, optionally pausing between them like a person reading and typing (`--think-ms`, exponentially
distributed, mean given; 0: back to back, which measures saturation); sessions run concurrently.

Reported: turn latency p50/p99 at 1, 10 and 50 concurrent sessions as the client sees it; the CPU time per
turn of the `parley up` process, alone and with its PostgreSQL and Redis; and the mean time of each step of
the turn (from the chat service's `parley_chat_turn_step_seconds` histogram). Baseline named: the chat
issue's goal, p50 <= 15 ms and p99 <= 50 ms at 50 sessions.

    .venv/bin/python -m bench.chat_bench [--turns 16] [--concurrency 1 10 50] [--think-ms 0]

`PARLEY_INPROCESS_CALLS=false` in the environment makes the co-hosted services call each other over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request

import uvloop

from bench.common import StealMeter, cpu_seconds, free_port, machine_busy_seconds, pct, process, table, wait_serving
from bench.inference.procs import upstream as upstream_process
from bench.inference.procs import wait_http
from parley.chat.v1 import chat_pb2 as pb
from parley.chat.v1 import chat_pb2_grpc
from parley.runtime.clients import make_channel

STEP_RE = re.compile(r'parley_chat_turn_step_seconds_(sum|count)\{step="([a-z_]+)"\} ([0-9.e+-]+)')
RPC_RE = re.compile(r'parley_grpc_request_duration_seconds_(sum|count)\{code="OK",method="([A-Za-z]+)",'
                    r'service="parley\.(?:memory|inference|tools)\.v1\.[A-Za-z]+"\} ([0-9.e+-]+)')
RPCS = ("AppendMessages", "Recall", "SearchDocuments", "Generate")
STEPS = ("check_model", "limits", "session", "persist_message", "context", "cache", "agent", "finish")


def scrape(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of each turn step's histogram, and of each internal RPC's server-side latency."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list[float]] = {}
    for kind, name, value in [*STEP_RE.findall(body), *RPC_RE.findall(body)]:
        out.setdefault(name, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


async def run_level(stub, sessions: int, turns: int, tag: str, think_ms: float = 0.0) -> list[float]:
    latencies: list[float] = []
    rng = random.Random(sessions)

    async def session(i: int) -> None:
        sid = ""
        for t in range(turns):
            if think_ms:  # also before the first turn, so sessions do not start in lockstep
                await asyncio.sleep(rng.expovariate(1000 / think_ms))
            started = time.perf_counter()
            r = await stub.Chat(pb.ChatRequest(user_id=f"bench-{tag}-{i}", session_id=sid,
                                               message=f"Question {t} from session {i}: what should I do today?",
                                               options=pb.ChatOptions(skip_cache=True)))
            latencies.append((time.perf_counter() - started) * 1000)
            sid = r.session_id

    await asyncio.gather(*(session(i) for i in range(sessions)))
    return latencies


def stack_env(data_dir: str, chat_port: int, metrics_port: int, upstream_port: int) -> dict[str, str]:
    """`parley up` with the instant model as its only route, and no rate limits (the load is one client)."""
    route = {"name": "instant", "provider": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
             "api_key_env": "PATH", "pricing": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
             "context_window": 128000}
    return {
        "PARLEY_DATA_DIR": data_dir, "PARLEY_CHAT_PORT": str(chat_port), "PARLEY_METRICS_PORT": str(metrics_port),
        "PARLEY_LOG_LEVEL": "WARNING", "PARLEY_LOG_JSON": "false", "HF_HUB_OFFLINE": "1",
        "PARLEY_INFERENCE__ROUTES": json.dumps([route]), "PARLEY_INFERENCE__DEFAULT_MODEL": "instant",
        "PARLEY_INFERENCE__LOCAL_ENABLED": "false",
        "PARLEY_CHAT__RATE_LIMIT_REQUESTS_PER_MIN": "0", "PARLEY_CHAT__RATE_LIMIT_TOKENS_PER_MIN": "0",
    }


def stack_cpu_seconds(upstream_pid: int) -> float:
    """CPU time the whole machine spent so far, less this process (the load) and the upstream model's: what
    `parley up`, its PostgreSQL and its Redis (daemons: not children of it) spent, and little else here."""
    return machine_busy_seconds() - time.process_time() - cpu_seconds(upstream_pid)


async def measure(args: argparse.Namespace, address: str, metrics_port: int, pid: int, upstream_pid: int) -> None:
    channel = make_channel(address)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    # Warm-up at the highest level: the connection pools grown to what it needs, code paths and input shapes
    # seen (the figures are of a service in steady state, not of its first minute).
    await run_level(stub, max(args.concurrency), 3, "warmup")
    rows, steps_rows = [], []
    for level in args.concurrency:
        before = scrape(metrics_port)
        started, steal = time.perf_counter(), StealMeter()
        own, stack = cpu_seconds(pid, descendants=False), stack_cpu_seconds(upstream_pid)
        lat = await run_level(stub, level, args.turns, f"c{level}", args.think_ms)
        elapsed = time.perf_counter() - started
        own_ms = (cpu_seconds(pid, descendants=False) - own) * 1000 / len(lat)
        stack_ms = (stack_cpu_seconds(upstream_pid) - stack) * 1000 / len(lat)
        after = scrape(metrics_port)
        rows.append((str(level), f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}", f"{len(lat) / elapsed:.0f}",
                     str(len(lat)), f"{own_ms:.1f}", f"{stack_ms:.1f}", f"{steal.percent():.1f}"))
        means = {step: (after[step][0] - before.get(step, (0, 0))[0]) /
                 max(1.0, after[step][1] - before.get(step, (0, 0))[1]) * 1000 for step in after}
        steps_rows.append((str(level), *(f"{means.get(s, 0):.2f}" for s in STEPS + RPCS)))
    await channel.close()
    mode = f"mean think time {args.think_ms:g} ms between turns" if args.think_ms else "back to back"
    inprocess = os.environ.get("PARLEY_INPROCESS_CALLS", "true")
    print(f"== chat turn overhead (`parley up`, instant upstream model; turns {mode}; "
          f"PARLEY_INPROCESS_CALLS={inprocess})")
    print(table(rows, ("sessions", "p50 ms", "p99 ms", "turns/s", "turns", "parley CPU ms/turn",
                       "+ PostgreSQL, Redis", "host steal %")))
    print("goal: p50 <= 15 ms, p99 <= 50 ms at 50 sessions")
    print("\n== mean time per step of the turn, and of the internal calls it makes (server side; ms)")
    print(table(steps_rows, ("sessions", *STEPS, *(f"{r} RPC" for r in RPCS))))
    print(json.dumps({"levels": rows}, indent=None))


def main(args: argparse.Namespace) -> None:
    up_port, chat_port, metrics_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="parley-chat-bench-") as tmp, \
            upstream_process(up_port, tokens=8) as upstream:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream, timeout=30)
        log = os.path.join(tmp, "parley-up.log")
        with process([sys.executable, "-m", "parley.cli", "up"],
                     stack_env(os.path.join(tmp, "data"), chat_port, metrics_port, up_port), log) as stack:
            try:
                wait_serving(f"127.0.0.1:{chat_port}", stack, timeout=300)
            except RuntimeError:
                print(open(log).read()[-4000:], file=sys.stderr)
                raise
            uvloop.run(measure(args, f"127.0.0.1:{chat_port}", metrics_port, stack.pid, upstream.pid))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=16, help="turns per session")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="mean pause of a session between turns (exponential); 0: back to back")
    main(parser.parse_args())
