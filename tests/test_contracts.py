"""The v1 contracts: buf lint/format clean, generated code current, every RPC mapped for grpc-gateway."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parley.chat.v1 import chat_pb2
from parley.inference.v1 import inference_pb2
from parley.memory.v1 import memory_pb2
from parley.tools.v1 import tools_pb2

ROOT = Path(__file__).resolve().parent.parent
BUF = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")


def _buf(*args: str) -> subprocess.CompletedProcess:
    assert BUF, "buf is not installed (pip install buf-bin)"
    return subprocess.run([BUF, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean():
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean():
    result = _buf("format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_bad_proto(tmp_path):
    """The lint setup really checks our files (a check that cannot fail proves nothing)."""
    bad = ROOT / "protos/parley/chat/v1/zz_lint_probe.proto"
    bad.write_text('syntax = "proto3";\npackage parley.chat.v1;\nmessage bad_name { string X = 1; }\n')
    try:
        result = _buf("lint")
    finally:
        bad.unlink()
    assert result.returncode != 0
    assert "PascalCase" in result.stdout


def test_generated_code_is_current(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_protos.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "nothing was generated"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is generated but not committed: run scripts/gen_protos.py"
        assert filecmp.cmp(tmp_path / rel, committed, shallow=False), f"{rel} is stale: run scripts/gen_protos.py"


SERVICES = [
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"],
    memory_pb2.DESCRIPTOR.services_by_name["MemoryService"],
    tools_pb2.DESCRIPTOR.services_by_name["ToolsService"],
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
]


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.full_name)
def test_every_rpc_has_an_http_rule(service):
    from google.api import annotations_pb2

    for method in service.methods:
        options = method.GetOptions()
        assert options.HasExtension(annotations_pb2.http), f"{method.full_name} has no google.api.http rule"
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.full_name)
def test_list_rpcs_paginate(service):
    for method in service.methods:
        if method.name.startswith("List"):
            fields = set(method.input_type.fields_by_name)
            assert {"page_size", "page_token"} <= fields, method.full_name
            assert "next_page_token" in method.output_type.fields_by_name, method.full_name


def test_chat_rest_contract_fields():
    """`{"user_id","message"}` in; `response, model, tokens_used, context_size, memory` out."""
    req = chat_pb2.ChatRequest.DESCRIPTOR.fields_by_name
    resp = chat_pb2.ChatResponse.DESCRIPTOR.fields_by_name
    assert {"user_id", "message", "session_id"} <= set(req)
    assert {"response", "model", "tokens_used", "context_size", "memory", "session_id", "tool_calls", "usage",
            "latency_ms"} <= set(resp)
