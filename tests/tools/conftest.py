"""Fixtures of the tools tests: a loopback HTTP server, a test plugin on sys.path, gRPC helpers."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.tools.tools_plugin_pkg import write_plugin


class _Handler(BaseHTTPRequestHandler):
    """Routes of the loopback server (what a market-data API and some hostile ones would answer)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/quote"):
            body = {"symbol": query.get("symbol", "?"), "price": 123.45, "path": url.path,
                    "query": query, "api_key_seen": self.headers.get("X-Api-Key")}
            self._send(200, json.dumps(body).encode(), "application/json; charset=utf-8")
        elif url.path == "/text":
            self._send(200, b"plain hello", "text/plain; charset=utf-8")
        elif url.path == "/binary":
            self._send(200, b"\x00\x01\x02", "application/octet-stream")
        elif url.path == "/big":
            self._send(200, json.dumps({"blob": "x" * 300_000}).encode(), "application/json")
        elif url.path == "/big-chunked":  # no Content-Length: the limit must be enforced while reading
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"y" * 10_000)
            self.close_connection = True
        elif url.path == "/redirect":
            self._send(302, b"", "text/plain", {"Location": query["to"]})
        elif url.path == "/slow":
            time.sleep(float(query.get("s", "3")))
            self._send(200, b"{}", "application/json")
        elif url.path == "/error":
            self._send(503, b'{"error": "maintenance"}', "application/json")
        else:
            self._send(404, b"not found", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that stops reading (the size-limit tests hang up mid-body) is expected: no traceback for it.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Loopback:
    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Loopback:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def loopback() -> Iterator[Loopback]:
    """A real HTTP server on 127.0.0.1 (a private address: allowed only when a test says so)."""
    with Loopback() as server:
        yield server


@pytest.fixture(scope="module")
def plugin_dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An installed distribution with `parley.tools` entry points, on sys.path for this module only."""
    root = write_plugin(tmp_path_factory.mktemp("plugin"))
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("parley_tools_testplugin", None)
