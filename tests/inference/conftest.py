"""Fixtures of the inference tests: the service over the real local model, llama.cpp's own
OpenAI-compatible server on loopback (same GGUF), and the instant OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from bench.inference.upstream import Upstream
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc
from parley.runtime.config import InferenceSettings, packaged_local_model_path
from tests.inference import hosted

GGUF = packaged_local_model_path()
LOCAL = "smollm2-135m-instruct"
TEST_N_CTX = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=text)


def weather_tool() -> pb.ToolDefinition:
    tool = pb.ToolDefinition(name="get_weather", description="Current weather in a city.")
    tool.parameters.update({
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    })
    return tool


def settings(**overrides) -> InferenceSettings:
    return InferenceSettings(local_n_ctx=TEST_N_CTX, **overrides)


@pytest.fixture(scope="session")
async def inference_app(start_stack):
    """The inference service alone, over the real SmolLM2 model."""
    async with start_stack(["inference"], inference=settings()) as app:
        yield app


async def channel_stub(address: str):
    channel = grpc.aio.insecure_channel(address)
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
async def stub(inference_app) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    channel, s = await channel_stub(inference_app.address)
    yield s
    await channel.close()


@pytest.fixture(autouse=True)
async def close_hosted() -> AsyncIterator[None]:
    """Closes what `hosted.core_with` opened for the test: its providers' HTTP clients, its loopback servers."""
    yield
    while hosted.CLEANUPS:
        await hosted.CLEANUPS.pop()()


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[Upstream]:
    """The instant OpenAI-compatible upstream of the benchmark, on a free loopback port."""
    server = await Upstream(keep_bodies=True).start()
    yield server
    await server.close()


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """llama.cpp's own OpenAI-compatible server (`python -m llama_cpp.server`) serving the same GGUF."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", "smollm2-server",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                if json.load(r)["data"]:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {proc.stderr.read().decode()[-2000:]}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("llama_cpp.server did not start within 90 s") from None
            time.sleep(0.2)
    yield base
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def collect(stream) -> tuple[list[pb.StreamGenerateResponse], pb.GenerateResponse]:
    """Every event of a StreamGenerate call, and the final response (asserting there is exactly one, last)."""
    events = [event async for event in stream]
    finals = [e for e in events if e.WhichOneof("event") == "final"]
    assert len(finals) == 1 and events[-1] is finals[0], [e.WhichOneof("event") for e in events]
    return events, finals[0].final.response


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
