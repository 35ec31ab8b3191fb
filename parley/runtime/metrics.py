"""Prometheus metrics: one registry per process, exposed on /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    """The process's metric registry and the gRPC server metrics every service shares.

    Services add their own metrics to `registry` (see `counter`/`histogram`).
    """

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        self.rpc_requests = Counter(
            "parley_grpc_requests_total",
            "gRPC requests handled, by service, method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_latency = Histogram(
            "parley_grpc_request_duration_seconds",
            "gRPC request latency (to the last message sent), by service, method and status code.",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._extra: dict[str, object] = {}

    def counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        """A counter registered once per process (services may ask for it twice in `parley up`)."""
        if name not in self._extra:
            self._extra[name] = Counter(name, doc, labels, registry=self.registry)
        return self._extra[name]  # type: ignore[return-value]

    def histogram(self, name: str, doc: str, labels: list[str], buckets=LATENCY_BUCKETS) -> Histogram:
        if name not in self._extra:
            self._extra[name] = Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        return self._extra[name]  # type: ignore[return-value]

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP endpoint; returns (server, thread) for shutdown, or None if port is 0."""
        if port == 0:
            return None
        return start_http_server(port, addr=host, registry=self.registry)
