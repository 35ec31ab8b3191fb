"""The foundation slice, end to end, through the real `parley` command.

`parley up` (embedded PostgreSQL+pgvector, embedded Redis, the real local model) →
`parley ask "My name is Ana. Remember it."` → stop → start again →
`parley ask --session <id> "What is my name?"`: the answer comes from history loaded
from PostgreSQL, with the model name and real token counts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

PARLEY = [sys.executable, "-m", "parley.cli"]
SERVICES = {
    "parley.chat.v1.ChatService",
    "parley.memory.v1.MemoryService",
    "parley.tools.v1.ToolsService",
    "parley.inference.v1.InferenceService",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ParleyUp:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.env = {
            **os.environ,
            "PARLEY_DATA_DIR": str(data_dir),
            "PARLEY_CHAT_PORT": str(port),
            "PARLEY_METRICS_PORT": "0",
            "PARLEY_USER": "ana-e2e",
            "PARLEY_CHAT_ADDR": f"127.0.0.1:{port}",
        }
        for unset in ("DATABASE_URL", "REDIS_URL"):
            self.env.pop(unset, None)
        self.port = port
        self.log = data_dir / "up.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        self.proc = subprocess.Popen(PARLEY + ["up"], env=self.env, stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"parley up exited early:\n{self.log.read_text()[-4000:]}")
            if self.all_serving():
                return
            time.sleep(0.5)
        raise AssertionError(f"parley up not serving after {timeout_s}s:\n{self.log.read_text()[-4000:]}")

    def all_serving(self) -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                return all(
                    stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                    for name in sorted(SERVICES)
                )
            except grpc.RpcError:
                return False

    def stop(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        assert code == 0, f"parley up exited with {code}:\n{self.log.read_text()[-4000:]}"

    def ask(self, *args: str) -> dict:
        out = subprocess.run(PARLEY + ["ask", "--json", *args], env=self.env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.mark.slow
def test_remembers_across_restart(tmp_path):
    up = ParleyUp(tmp_path / "data", free_port())
    (tmp_path / "data").mkdir()
    up.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{up.port}") as channel:
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            assert SERVICES <= {s.name for s in resp.list_services_response.service}
        first = up.ask("My name is Ana. Remember it.")
    finally:
        up.stop()
    session = first["session_id"]
    assert first["model"] == "smollm2-135m-instruct"
    assert first["tokens_used"] > 0 and first["usage"]["completion_tokens"] > 0

    up.start()
    try:
        second = up.ask("--session", session, "What is my name?")
        chat = subprocess.run(PARLEY + ["chat", "--session", session], env=up.env, text=True, capture_output=True,
                              input="Hello again!\n/session\n/new\nHi, who are you?\n/quit\n", timeout=300)
    finally:
        up.stop()
    # `parley chat`: streams answers, continues the given session, /new starts another one
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("parley> ") == 2
    footers = re.findall(r"-- session ([0-9a-f-]{36}) \| model smollm2-135m-instruct", chat.stderr)
    assert footers[0] == session and footers[1] != session, chat.stderr
    assert f"-- session {session}" in chat.stderr and "a new session starts" in chat.stderr
    assert second["session_id"] == session
    assert second["model"] == "smollm2-135m-instruct"
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"], "history was part of the prompt"
    assert second["tokens_used"] == second["usage"]["prompt_tokens"] + second["usage"]["completion_tokens"]
    assert second["context_size"] == second["usage"]["prompt_tokens"]
    assert "Ana" in second["response"], second["response"]
