"""Chat turn overhead: everything in a turn except the model's own decoding.

The whole stack (chat, memory, tools, inference; real PostgreSQL+pgvector, real Redis, the real
embedding model) runs in one process against an instant OpenAI-compatible upstream model (a
separate process, bench/inference/upstream.py, answering at once). Each session sends turns one
after another, optionally pausing between them like a person reading and typing (`--think-ms`, exponentially
distributed, mean given; 0: back to back, which measures saturation); sessions run concurrently. Reported: turn latency p50/p99 at 1, 10 and 50
concurrent sessions, the CPU time per turn of the process (all four services and the client; not
PostgreSQL's or Redis'), and the mean time of each step of the turn (from the chat service's
`parley_chat_turn_step_seconds` histogram). Baseline named: the chat issue's goal, p50 <= 15 ms
and p99 <= 50 ms at 50 sessions.

    .venv/bin/python -m bench.chat_bench [--turns 16] [--concurrency 1 10 50] [--think-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import StealMeter, free_port, pct, table
from parley.chat.v1 import chat_pb2 as pb
from parley.chat.v1 import chat_pb2_grpc
from parley.runtime.app import running
from parley.runtime.clients import make_channel
from parley.runtime.config import Settings
from parley.runtime.logging import configure_logging

STEP_RE = re.compile(r'parley_chat_turn_step_seconds_(sum|count)\{step="([a-z_]+)"\} ([0-9.e+-]+)')


def scrape_steps(port: int) -> dict[str, tuple[float, float]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list[float]] = {}
    for kind, step, value in STEP_RE.findall(body):
        out.setdefault(step, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
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


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging("WARNING", json=False)
    up_port, metrics_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.inference.upstream", "--port", str(up_port),
                                 "--tokens", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with tempfile.TemporaryDirectory(prefix="parley-chat-bench-") as tmp:
            route = {"name": "instant", "provider": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1",
                     "api_key_env": "PATH", "pricing": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
                     "context_window": 128000}
            settings = Settings(
                _env_file=None, data_dir=Path(tmp), metrics_port=metrics_port, log_level="WARNING", log_json=False,
                inference={"routes": [route], "default_model": "instant", "local_enabled": False},
                chat={"rate_limit_requests_per_min": 0, "rate_limit_tokens_per_min": 0},
            )
            async with running(settings, ["memory", "inference", "tools", "chat"], port=0, embedded=True) as app:
                channel = make_channel(app.address)
                stub = chat_pb2_grpc.ChatServiceStub(channel)
                # Warm-up at the highest level: the connection pools grown to what it needs, code paths and input
                # shapes seen (the figures are of a service in steady state, not of its first minute).
                await run_level(stub, max(args.concurrency), 3, "warmup")
                rows, steps_rows = [], []
                for level in args.concurrency:
                    before = scrape_steps(metrics_port)
                    started, steal, cpu = time.perf_counter(), StealMeter(), time.process_time()
                    lat = await run_level(stub, level, args.turns, f"c{level}", args.think_ms)
                    elapsed = time.perf_counter() - started
                    cpu_ms = (time.process_time() - cpu) * 1000 / len(lat)
                    after = scrape_steps(metrics_port)
                    rows.append((str(level), f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}", f"{len(lat) / elapsed:.0f}",
                                 str(len(lat)), f"{cpu_ms:.1f}", f"{steal.percent():.1f}"))
                    means = {step: (after[step][0] - before.get(step, (0, 0))[0]) /
                             max(1.0, after[step][1] - before.get(step, (0, 0))[1]) * 1000 for step in after}
                    steps_rows.append((str(level), *(f"{means.get(s, 0):.2f}" for s in STEPS)))
                mode = f"mean think time {args.think_ms:g} ms between turns" if args.think_ms else "back to back"
                print(f"== chat turn overhead (instant upstream model, real stack; turns {mode})")
                print(table(rows, ("sessions", "p50 ms", "p99 ms", "turns/s", "turns", "CPU ms/turn", "host steal %")))
                print("goal: p50 <= 15 ms, p99 <= 50 ms at 50 sessions")
                print("\n== mean time per step (ms)")
                print(table(steps_rows, ("sessions", *STEPS)))
                print(json.dumps({"levels": rows}, indent=None))
                await channel.close()
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


STEPS = ("check_model", "limits", "session", "persist_message", "context", "cache", "agent", "finish")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=16, help="turns per session")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="mean pause of a session between turns (exponential); 0: back to back")
    asyncio.run(main(parser.parse_args()))
