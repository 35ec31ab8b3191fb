"""The chat turn with auth on: cross-user denial on every RPC, cache, idempotency, rate limit, approvals.

A stack of its own: API-key auth, 4 turns per minute, and a side-effecting plugin tool
(`send_email`) that records each real execution in a file, so the approval flow can
prove a tool did or did not run. The real local model decides everything.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from parley.chat.v1 import chat_pb2 as pb
from parley.chat.v1 import chat_pb2_grpc
from parley.runtime.clients import make_channel
from parley.runtime.db import Database
from services.chat.guards.auth import create_api_key

FAST = pb.ChatOptions(max_tokens=24, temperature=0)

PLUGIN = '''
import json, os
from services.tools.core import tool

@tool("send_email", "Send an email to someone. Use it for requests like 'send an email to ana@example.com saying "
      "hello' or 'email Bob that the meeting moved to Friday'.",
      {"type": "object", "additionalProperties": False, "required": ["to", "body"],
       "properties": {"to": {"type": "string", "maxLength": 200}, "body": {"type": "string", "maxLength": 500}}},
      side_effects=True)
def send_email(to, body):
    with open(os.environ["PARLEY_TEST_OUTBOX"], "a") as out:
        out.write(json.dumps({"to": to, "body": body}) + "\\n")
    return {"sent": True, "to": to}

def make_tools(host):
    return [send_email]
'''


@pytest.fixture(scope="module")
def outbox(tmp_path_factory, monkeypatch_module) -> Path:
    root = tmp_path_factory.mktemp("outbox-plugin")
    (root / "parley_outbox_plugin.py").write_text(PLUGIN)
    info = root / "parley_outbox_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parley-outbox-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[parley.tools]\noutbox = parley_outbox_plugin:make_tools\n")
    box = root / "outbox.jsonl"
    box.write_text("")
    monkeypatch_module.setenv("PARLEY_TEST_OUTBOX", str(box))
    sys.path.insert(0, str(root))
    yield box
    sys.path.remove(str(root))
    sys.modules.pop("parley_outbox_plugin", None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
async def guarded(start_stack, outbox):
    async with start_stack(["memory", "inference", "tools", "chat"],
                           chat={"auth_mode": "api_key", "rate_limit_requests_per_min": 4}) as app:
        channel = make_channel(app.address)
        yield chat_pb2_grpc.ChatServiceStub(channel), app
        await channel.close()


@pytest.fixture(scope="module")
async def keys(database_url, guarded):
    db = Database(database_url)
    made = {
        "alice": await create_api_key(db.engine, "alice-g", name="test"),
        "bob": await create_api_key(db.engine, "bob-g", name="test"),
        "admin": await create_api_key(db.engine, "ops", admin=True, name="test"),
    }
    await db.close()
    return {who: (("authorization", f"Bearer {key}"),) for who, key in made.items()}


def user() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


async def user_key(database_url: str, user_id: str):
    db = Database(database_url)
    try:
        return (("authorization", f"Bearer {await create_api_key(db.engine, user_id)}"),)
    finally:
        await db.close()


async def failing(awaitable, code):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, (info.value.code(), info.value.details())
    return info.value


async def test_callers_must_authenticate_and_act_only_for_themselves(guarded, keys):
    chat, _ = guarded
    err = await failing(chat.Chat(pb.ChatRequest(user_id="alice-g", message="hi", options=FAST)),
                        grpc.StatusCode.UNAUTHENTICATED)
    assert "authorization" in err.details()
    mine = await chat.Chat(pb.ChatRequest(user_id="alice-g", message="Hello there", options=FAST),
                           metadata=keys["alice"])
    sid = mine.session_id
    denied = grpc.StatusCode.PERMISSION_DENIED
    bob = keys["bob"]
    await failing(chat.Chat(pb.ChatRequest(user_id="alice-g", session_id=sid, message="hi", options=FAST),
                            metadata=bob), denied)
    await failing(chat.StreamChat(pb.StreamChatRequest(user_id="alice-g", message="hi"), metadata=bob).read(), denied)
    await failing(chat.CreateSession(pb.CreateSessionRequest(user_id="alice-g"), metadata=bob), denied)
    await failing(chat.GetSession(pb.GetSessionRequest(user_id="alice-g", session_id=sid), metadata=bob), denied)
    await failing(chat.ListSessions(pb.ListSessionsRequest(user_id="alice-g"), metadata=bob), denied)
    await failing(chat.ListSessionMessages(pb.ListSessionMessagesRequest(user_id="alice-g", session_id=sid),
                                           metadata=bob), denied)
    await failing(chat.DeleteSession(pb.DeleteSessionRequest(user_id="alice-g", session_id=sid), metadata=bob), denied)
    await failing(chat.ResolveApproval(pb.ResolveApprovalRequest(user_id="alice-g", approval_id=str(uuid.uuid4()),
                                                                 decision=pb.DECISION_DENY), metadata=bob), denied)
    # bob naming his own user on alice's session id: the session is simply not his
    await failing(chat.GetSession(pb.GetSessionRequest(user_id="bob-g", session_id=sid), metadata=bob),
                  grpc.StatusCode.NOT_FOUND)
    # an admin key may act for anyone
    got = await chat.GetSession(pb.GetSessionRequest(user_id="alice-g", session_id=sid), metadata=keys["admin"])
    assert got.session.message_count == 2


async def test_repeated_question_is_served_from_cache(guarded, database_url):
    chat, _ = guarded
    uid = user()
    meta = await user_key(database_url, uid)
    first = await chat.Chat(pb.ChatRequest(user_id=uid, message="Name one primary colour.", options=FAST),
                            metadata=meta)
    again = await chat.Chat(pb.ChatRequest(user_id=uid, message="  name ONE primary colour. ", options=FAST),
                            metadata=meta)
    assert not first.cache_hit and again.cache_hit
    assert again.response == first.response and again.model == first.model
    assert again.tokens_used == 0 and again.usage.cost_usd == 0
    skipped = await chat.Chat(pb.ChatRequest(user_id=uid, message="Name one primary colour.",
                                             options=pb.ChatOptions(max_tokens=24, skip_cache=True)), metadata=meta)
    assert not skipped.cache_hit and skipped.tokens_used > 0
    db = Database(database_url)
    async with db.engine.connect() as conn:
        from sqlalchemy import text

        rows = (await conn.execute(text("SELECT kind, cache_hit FROM usage_records WHERE user_id = :u ORDER BY id"),
                                   {"u": uid})).all()
    await db.close()
    assert [(r.kind, r.cache_hit) for r in rows] == [("generate", False), ("cache", True), ("generate", False)]


async def test_idempotent_retry_returns_the_first_result(guarded, database_url):
    chat, _ = guarded
    uid = user()
    meta = await user_key(database_url, uid)
    req = pb.ChatRequest(user_id=uid, message="Give me a short greeting.", request_id="retry-42", options=FAST)
    first = await chat.Chat(req, metadata=meta)
    retry = await chat.Chat(req, metadata=meta)
    assert retry.message_id == first.message_id and retry.session_id == first.session_id
    assert retry.response == first.response
    msgs = await chat.ListSessionMessages(pb.ListSessionMessagesRequest(user_id=uid, session_id=first.session_id),
                                          metadata=meta)
    assert len(msgs.messages) == 2, "the retried turn did not run twice"
    other = pb.ChatRequest(user_id=uid, message="Something else", request_id="retry-42", options=FAST)
    await failing(chat.Chat(other, metadata=meta), grpc.StatusCode.INVALID_ARGUMENT)


async def test_rate_limit_refuses_with_retry_info(guarded, database_url):
    chat, _ = guarded
    uid = user()
    meta = await user_key(database_url, uid)
    for i in range(4):
        await chat.Chat(pb.ChatRequest(user_id=uid, message=f"Count to {i + 1}.",
                                       options=pb.ChatOptions(max_tokens=8, skip_cache=True)), metadata=meta)
    err = await failing(chat.Chat(pb.ChatRequest(user_id=uid, message="One more?", options=FAST), metadata=meta),
                        grpc.StatusCode.RESOURCE_EXHAUSTED)
    details = rpc_status.from_call(err).details
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details), "RetryInfo tells when to retry"


async def test_side_effecting_tool_waits_for_approval(guarded, database_url, outbox):
    chat, _ = guarded
    uid = user()
    meta = await user_key(database_url, uid)
    question = "Send an email to bob@example.com saying the report is ready."
    paused = await chat.Chat(pb.ChatRequest(user_id=uid, message=question,
                                            options=pb.ChatOptions(max_tokens=64, temperature=0)), metadata=meta)
    assert [p.tool_name for p in paused.pending_approvals] == ["send_email"], (paused.tool_calls, paused.warnings)
    assert outbox.read_text() == "", "nothing was sent before approval"
    approval = paused.pending_approvals[0].approval_id
    # another user cannot resolve it, and a bad decision is refused
    await failing(chat.ResolveApproval(pb.ResolveApprovalRequest(user_id=uid, approval_id=approval), metadata=meta),
                  grpc.StatusCode.INVALID_ARGUMENT)
    done = await chat.ResolveApproval(pb.ResolveApprovalRequest(user_id=uid, approval_id=approval,
                                                                decision=pb.DECISION_APPROVE), metadata=meta)
    sent = [json.loads(line) for line in outbox.read_text().splitlines()]
    approved_args = json.loads(paused.pending_approvals[0].arguments_json)
    assert sent == [approved_args], "exactly the approved call ran, once"
    assert [t.name for t in done.response.tool_calls] == ["send_email"] and not done.response.tool_calls[0].error
    assert json.loads(done.response.tool_calls[0].arguments_json) == approved_args
    assert not done.response.pending_approvals and done.response.message_id
    await failing(chat.ResolveApproval(pb.ResolveApprovalRequest(user_id=uid, approval_id=approval,
                                                                 decision=pb.DECISION_APPROVE), metadata=meta),
                  grpc.StatusCode.NOT_FOUND)

    paused = await chat.Chat(pb.ChatRequest(user_id=uid, message=question,
                                            options=pb.ChatOptions(max_tokens=64, skip_cache=True)), metadata=meta)
    denied = await chat.ResolveApproval(pb.ResolveApprovalRequest(
        user_id=uid, approval_id=paused.pending_approvals[0].approval_id, decision=pb.DECISION_DENY), metadata=meta)
    assert len(outbox.read_text().splitlines()) == 1, "a denied call does not run"
    assert "denied" in denied.response.tool_calls[0].error
