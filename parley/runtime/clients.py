"""Async gRPC clients with deadlines, retries and request-id propagation.

`Client` wraps one stub: every call gets a deadline (the default unless the caller
gives one) and a downstream error becomes a domain error for our own caller
(`errors.from_rpc_error`). Transient UNAVAILABLE failures are retried by gRPC's own
retry policy, declared in the channel's service config.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

import grpc

from parley.runtime.errors import from_rpc_error
from parley.runtime.interceptors import RequestIdClientInterceptor

StubT = TypeVar("StubT")

# Transient UNAVAILABLE is retried, unless the server's `grpc-retry-pushback-ms` says not to (gRFC A6). The
# in-process channel of co-hosted services (`inprocess.LocalChannel`) follows the same policy.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

_SERVICE_CONFIG = json.dumps(
    {
        # spread calls over every address a name resolves to (a headless Kubernetes Service)
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}],
    }
)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024

CHANNEL_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


def make_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=[RequestIdClientInterceptor()])


class Client(Generic[StubT]):
    """One service's stub with a default deadline and error mapping."""

    def __init__(self, peer: str, address: str, stub_cls: type[StubT], timeout_s: float,
                 metadata: tuple[tuple[str, str], ...] = (), channel: Any = None) -> None:
        self.peer = peer
        self.address = address
        self.timeout_s = timeout_s
        self.channel = channel or make_channel(address)  # given: an `inprocess.LocalChannel` to a co-hosted peer
        self.stub: StubT = stub_cls(self.channel)
        self._metadata = metadata

    async def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        rpc = getattr(self.stub, method)
        try:
            return await rpc(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata or None)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, self.peer) from err

    async def stream(self, method: str, request: Any, timeout_s: float | None = None) -> AsyncIterator[Any]:
        rpc = getattr(self.stub, method)
        call = rpc(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata or None)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, self.peer) from err
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()
