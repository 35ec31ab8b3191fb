"""The REST gateway (gateway/), built once per machine and started in front of real Parley servers.

`gateway/build.sh` fetches Go + grpc-gateway v2 from Debian's package registry into ~/.cache/parley/go-trixie the
first time (about 20 s), then builds (about 60 s cold, instant when the sources are unchanged). The tests skip only
when that toolchain cannot be set up at all (build.sh exits 3: no apt-get/dpkg, or the Debian mirror unreachable);
a compile error fails them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "gateway" / "build.sh"
TOOLCHAIN_UNAVAILABLE = 3  # build.sh's exit status when Go cannot be set up


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def gateway_binary() -> Path:
    """Path of the built gateway binary (skips with the reason when no Go toolchain can be set up)."""
    proc = subprocess.run([str(BUILD)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode == TOOLCHAIN_UNAVAILABLE:
        pytest.skip(f"Go toolchain for the gateway could not be set up (gateway/build.sh exit 3):\n{_tail(proc.stderr)}")
    assert proc.returncode == 0, f"gateway/build.sh failed ({proc.returncode}):\n{_tail(proc.stderr, 40)}"
    binary = Path(proc.stdout.strip().splitlines()[-1])
    assert binary.is_file() and os.access(binary, os.X_OK), binary
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """One gateway process on a free port; `base_url` for httpx."""

    def __init__(self, binary: Path, upstreams: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [str(binary), "-listen", f"127.0.0.1:{self.port}", "-log-json=false"]
        for name, addr in upstreams.items():
            args += [f"-{name}-addr", addr]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"gateway exited ({self.proc.returncode}):\n{self.log()}")
                try:
                    if (await client.get("/livez")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"gateway not up after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_gateway(gateway_binary: Path, tmp_path_factory: pytest.TempPathFactory):
    """`async with start_gateway({"memory": addr, ...}) as gw:` runs a gateway in front of those addresses."""
    from contextlib import asynccontextmanager

    logs = tmp_path_factory.mktemp("gateway-logs")

    @asynccontextmanager
    async def start(upstreams: dict[str, str]) -> AsyncIterator[Gateway]:
        gw = Gateway(gateway_binary, upstreams, logs / f"gateway-{len(list(logs.iterdir()))}.log")
        try:
            await gw.wait_ready()
            yield gw
        finally:
            gw.stop()

    return start
