"""Probes of running Parley services: gRPC health checks and Prometheus /metrics.

Used by container healthchecks (docker-compose), by the operator dashboard, and from a shell:

    python -m parley.health 127.0.0.1:50051 --service memory     exit 0 when SERVING, 1 otherwise
    python -m parley.health --all                                 every service at PARLEY_<SVC>_ADDR (or the chat
                                                                  address, where `parley up` serves all four)

`add_arguments`/`run` back `parley health`, `run_dashboard` backs `parley dashboard` (parley/cli.py). grpc is
imported inside the functions, so importing this module costs nothing.

It imports only grpc and the health stubs, so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_FULL_NAMES = {
    "chat": "parley.chat.v1.ChatService",
    "memory": "parley.memory.v1.MemoryService",
    "inference": "parley.inference.v1.InferenceService",
    "tools": "parley.tools.v1.ToolsService",
}
DEFAULT_PORTS = {"chat": 50050, "memory": 50051, "inference": 50052, "tools": 50053}


def check(addr: str, service: str = "", timeout_s: float = 2.0) -> str:
    """gRPC health of `service` (short or full name; "" = the whole server) at `addr`.

    Returns SERVING, NOT_SERVING, SERVICE_UNKNOWN (the server does not host it) or UNREACHABLE.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    full = SERVICE_FULL_NAMES.get(service, service)
    with grpc.insecure_channel(addr) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=full), timeout=timeout_s, wait_for_ready=False
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def service_addresses(env: dict[str, str] | None = None) -> dict[str, str]:
    """Where each service is: PARLEY_<SVC>_ADDR, else the chat address (`parley up` hosts all four on it),
    else 127.0.0.1:PARLEY_CHAT_PORT (default 50050)."""
    env = dict(os.environ if env is None else env)
    chat = env.get("PARLEY_CHAT_ADDR") or f"127.0.0.1:{env.get('PARLEY_CHAT_PORT') or DEFAULT_PORTS['chat']}"
    return {name: env.get(f"PARLEY_{name.upper()}_ADDR") or chat for name in SERVICE_FULL_NAMES}


def check_all(addrs: dict[str, str], timeout_s: float = 2.0) -> dict[str, str]:
    """Health of several services at once: {name: status}."""
    with ThreadPoolExecutor(max_workers=max(1, len(addrs))) as pool:
        futures = {name: pool.submit(check, addr, name, timeout_s) for name, addr in addrs.items()}
        return {name: f.result() for name, f in futures.items()}


def metrics_url(addr: str, metrics_port: int) -> str:
    """The /metrics URL of the process serving gRPC at `addr` (same host, PARLEY_METRICS_PORT)."""
    host = addr.rsplit(":", 1)[0] if ":" in addr else addr
    return f"http://{host}:{metrics_port}/metrics"


@dataclass
class MetricsSummary:
    """The gRPC request counters of one process's /metrics."""

    url: str
    reachable: bool
    error: str = ""
    requests_by_code: dict[str, float] = field(default_factory=dict)
    requests_by_method: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.requests_by_code.values())

    @property
    def error_rate(self) -> float | None:
        if not self.total:
            return None
        return 1 - self.requests_by_code.get("OK", 0.0) / self.total


def scrape(url: str, timeout_s: float = 2.0) -> MetricsSummary:
    """Read a Prometheus text endpoint and sum `parley_grpc_requests_total` by code and by method."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - operator-configured URL
            text = resp.read(5_000_000).decode("utf-8", "replace")
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable", reported as such
        return MetricsSummary(url, False, f"{type(exc).__name__}: {exc}")
    summary = MetricsSummary(url, True)
    for family in text_string_to_metric_families(text):
        if family.name != "parley_grpc_requests":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            code = sample.labels.get("code", "")
            method = f"{sample.labels.get('service', '')}/{sample.labels.get('method', '')}"
            summary.requests_by_code[code] = summary.requests_by_code.get(code, 0.0) + sample.value
            summary.requests_by_method[method] = summary.requests_by_method.get(method, 0.0) + sample.value
    return summary


def dashboard_app_path() -> Path:
    """dashboard/app.py: next to the `parley` package in a checkout (editable install), else under the working
    directory (the container image keeps it at /app/dashboard)."""
    import parley

    for base in (Path(parley.__file__).resolve().parent.parent, Path.cwd()):
        candidate = base / "dashboard" / "app.py"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("dashboard/app.py not found: run from the Parley checkout (or /app in the image)")


def dashboard_command(port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line of the operator dashboard."""
    return [sys.executable, "-m", "streamlit", "run", str(dashboard_app_path()),
            f"--server.port={port}", f"--server.address={address}", "--server.headless=true",
            "--browser.gatherUsageStats=false"]


def run_dashboard(port: int = 8501, address: str = "127.0.0.1") -> int:
    """Replace this process with the Streamlit dashboard (needs the `dashboard` extra)."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        print("parley dashboard: Streamlit is not installed: pip install -e '.[dashboard]'", file=sys.stderr)
        return 2
    cmd = dashboard_command(port, address)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `parley health` (also used by `python -m parley.health`)."""
    parser.add_argument("addr", nargs="?", help="host:port (default: the service's PARLEY_<SVC>_ADDR)")
    parser.add_argument("--service", default="", help="memory, inference, tools, chat or a full name ('': server)")
    parser.add_argument("--all", action="store_true", help="check all four services; print JSON")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")


def run(args: argparse.Namespace) -> int:
    """Print the status; 0 when SERVING (all SERVING with --all), else 1."""
    if args.all:
        statuses = check_all(service_addresses(), args.timeout)
        print(json.dumps(statuses))
        return 0 if all(s == "SERVING" for s in statuses.values()) else 1
    addrs = service_addresses()
    addr = args.addr or addrs.get(args.service) or addrs["chat"]
    status = check(addr, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
