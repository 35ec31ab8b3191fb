"""A `grpc.aio` server with health checking, reflection, metrics and graceful shutdown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from parley.runtime.clients import MAX_MESSAGE_BYTES
from parley.runtime.inprocess import LocalChannel, LocalHandlers
from parley.runtime.interceptors import InternalGuard, ObservabilityInterceptor
from parley.runtime.logging import get_logger
from parley.runtime.metrics import Metrics

_log = get_logger("parley.server")


@dataclass
class ServiceBinding:
    """What a service contributes to a server."""

    name: str  # short name: memory, inference, tools, chat
    full_names: tuple[str, ...]  # proto service names, for health and reflection
    register: Callable[[grpc.aio.Server], None]
    internal: bool = True  # only the chat service faces callers; the others answer Parley services only


class GrpcServer:
    """One listening gRPC server hosting one or more services."""

    def __init__(self, host: str, port: int, metrics: Metrics, grace_s: float, internal_token: str | None = None
                 ) -> None:
        self._internal = InternalGuard(frozenset(), internal_token)
        interceptors = [ObservabilityInterceptor(metrics, self._internal)]
        self._local = LocalHandlers(interceptors)  # the same handlers, for in-process calls of co-hosted services
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._grace_s = grace_s
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.host = host
        self._names: list[str] = []

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        return f"{host}:{self.port}"

    def local_channel(self) -> LocalChannel:
        """A channel to this server's services that calls their handlers in this process (`inprocess`)."""
        return LocalChannel(self._local)

    def add(self, binding: ServiceBinding) -> None:
        binding.register(self._server)
        binding.register(self._local)
        self._names.extend(binding.full_names)
        if binding.internal:
            self._internal.services = self._internal.services | set(binding.full_names)

    async def start(self) -> None:
        reflection.enable_server_reflection(
            (*self._names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        await self._server.start()
        for name in self._names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        _log.info("listening", address=self.address, services=self._names)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self._grace_s)
        self._local.open = False  # in-process calls made after this fail as UNAVAILABLE, as a stopped server's
        _log.info("stopped", address=self.address)
