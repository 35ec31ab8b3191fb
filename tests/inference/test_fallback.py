"""Retries, fallbacks and cooldowns against real loopback HTTP servers (a closed port, a server that
answers 503, one that is too slow, one that rejects the request)."""

from __future__ import annotations

import grpc
import pytest

from bench.inference.upstream import Upstream
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc
from parley.runtime.clients import make_channel
from tests.inference.conftest import channel_stub, collect, free_port, settings, user
from tests.inference.test_bad_input import expect


@pytest.fixture(scope="module")
async def servers():
    made = {
        "ok": Upstream(),
        "busy": Upstream(status=503),
        "cooling": Upstream(status=503),
        "recovering": Upstream(status=503, fail_first=1),
        "slow": Upstream(delay_s=2.0),
        "rejecting": Upstream(status=400),
    }
    for server in made.values():
        await server.start()
    yield made
    for server in made.values():
        await server.close()


@pytest.fixture(scope="module")
async def address(start_stack, servers):
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there

    def route(name, base_url, **extra):
        return {"name": name, "provider": "openai", "base_url": base_url, **extra}

    routes = [
        route("backup", servers["ok"].base_url),
        route("down", closed, fallbacks=["backup"], max_retries=1),
        route("busy", servers["busy"].base_url, fallbacks=["backup"], max_retries=2),
        route("cooling", servers["cooling"].base_url, fallbacks=["backup"], max_retries=0),
        route("recovering", servers["recovering"].base_url, max_retries=2),
        route("slow", servers["slow"].base_url, fallbacks=["backup"], timeout_s=0.3, max_retries=0),
        route("rejecting", servers["rejecting"].base_url, fallbacks=["backup"]),
        route("dead-end", closed, max_retries=1),
        route("busy-only", servers["busy"].base_url, max_retries=1),
    ]
    config = settings(routes=routes, retry_initial_backoff_s=0.01, retry_max_backoff_s=0.05,
                      cooldown_failures=2, cooldown_s=60)
    async with start_stack(["inference"], inference=config) as app:
        yield app.address


@pytest.fixture(scope="module")
async def stub(address):
    channel, s = await channel_stub(address)
    yield s
    await channel.close()


def ask(model: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, messages=[user("hi")], sampling=pb.SamplingParams(max_tokens=8))


async def test_first_provider_down_second_answers(stub):
    r = await stub.Generate(ask("down"))
    assert (r.model, r.provider, list(r.fallbacks_tried)) == ("backup", "openai", ["down"])
    assert r.message.content == "tok " * 8


async def test_first_provider_answers_503_second_answers_after_retries(stub, servers):
    before = servers["busy"].requests
    events, final = await collect(stub.StreamGenerate(pb.StreamGenerateRequest(
        model="busy", messages=[user("hi")], sampling=pb.SamplingParams(max_tokens=8))))
    assert final.model == "backup" and list(final.fallbacks_tried) == ["busy"]
    assert servers["busy"].requests - before == 3  # one try and two retries, then the fallback
    assert "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta") == "tok " * 8


async def test_a_timeout_falls_back(stub):
    r = await stub.Generate(ask("slow"))
    assert r.model == "backup" and list(r.fallbacks_tried) == ["slow"]
    assert r.timing.total_ms < 1500  # 0.3 s timeout, not the 2 s the slow server takes


async def test_a_retry_can_succeed_without_fallback(stub, servers):
    r = await stub.Generate(ask("recovering"))
    assert r.model == "recovering" and not r.fallbacks_tried
    assert servers["recovering"].requests == 2


async def test_a_rejected_request_is_not_retried_nor_sent_elsewhere(stub, servers):
    await expect(stub.Generate(ask("rejecting")), grpc.StatusCode.INVALID_ARGUMENT,
                 "rejecting rejected the request: upstream answers 400")
    assert servers["rejecting"].requests == 1


async def test_no_provider_left_is_unavailable_and_says_why(stub):
    err = await expect(stub.Generate(ask("dead-end")), grpc.StatusCode.UNAVAILABLE,
                       "no provider could serve dead-end", "dead-end: connection", "cannot reach the provider")
    # The service already retried and fell back: callers' gRPC retry policies are told not to retry again.
    assert ("grpc-retry-pushback-ms", "-1") in tuple(err.trailing_metadata())


async def test_a_failing_provider_cools_down(stub, servers):
    cooling = servers["cooling"]
    for _ in range(2):  # cooldown_failures=2
        r = await stub.Generate(ask("cooling"))
        assert r.model == "backup"
    seen = cooling.requests
    r = await stub.Generate(ask("cooling"))
    assert r.model == "backup" and list(r.fallbacks_tried) == ["cooling"]
    assert cooling.requests == seen  # skipped while cooling down: no request reached it


async def test_callers_retry_policies_do_not_multiply_provider_attempts(address, servers):
    """Parley's own channels retry UNAVAILABLE (4 attempts); the service's answer tells them not to, because it
    retried the provider itself: one call, one try plus one retry upstream, not four times that."""
    channel = make_channel(address)
    try:
        before = servers["busy"].requests
        await expect(inference_pb2_grpc.InferenceServiceStub(channel).Generate(ask("busy-only")),
                     grpc.StatusCode.UNAVAILABLE, "busy-only")
        assert servers["busy"].requests - before == 2
    finally:
        await channel.close()
