"""The chat service end to end over gRPC: real memory, tools and inference services, the real local model."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from parley.chat.v1 import chat_pb2 as pb

FAST = pb.ChatOptions(max_tokens=48, temperature=0)


def uid() -> str:
    return f"chat-{uuid.uuid4().hex[:10]}"


async def expect_error(awaitable, code: grpc.StatusCode, *fragments: str):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()


async def test_chat_contract(chat):
    r = await chat.Chat(pb.ChatRequest(user_id="123", message="Say hello in one short sentence.", options=FAST))
    assert r.response.strip()
    assert r.model == "smollm2-135m-instruct" and r.provider == "local"
    assert r.tokens_used == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    assert r.context_size == r.usage.prompt_tokens
    assert r.usage.priced and r.usage.model_calls == 1
    assert r.session_id and r.latency_ms > 0 and r.message_id


async def test_memory_across_sessions(chat):
    user = uid()
    await chat.Chat(pb.ChatRequest(user_id=user, message="My favourite city is Lisbon, I lived there for years.",
                                   options=FAST))
    r = await chat.Chat(pb.ChatRequest(user_id=user, message="Which city is my favourite?", options=FAST))
    assert any("Lisbon" in m.content for m in r.memory), list(r.memory)
    hit = next(m for m in r.memory if "Lisbon" in m.content)
    assert hit.source == "message" and hit.role == "user" and hit.score > 0
    # a stranger's turn recalls nothing of this user's
    other = await chat.Chat(pb.ChatRequest(user_id=uid(), message="Which city is my favourite?", options=FAST))
    assert not any("Lisbon" in m.content for m in other.memory)


async def test_sales_question_reaches_the_sales_tool(chat):
    r = await chat.Chat(pb.ChatRequest(user_id=uid(), message="How many sales did we close last month?",
                                       options=pb.ChatOptions(max_tokens=64, temperature=0)))
    assert [t.name for t in r.tool_calls] == ["sales_report"], r
    call = r.tool_calls[0]
    assert json.loads(call.arguments_json)["period"] == "last_month"
    assert not call.error, call.error
    assert json.loads(call.result_json), "the tool returned data"
    assert r.usage.model_calls == 2, "one call filled the arguments, one answered from the result"
    assert r.response.strip()


async def test_non_tool_question_calls_no_tool(chat):
    r = await chat.Chat(pb.ChatRequest(user_id=uid(), message="What is my name?", options=FAST))
    assert list(r.tool_calls) == []


async def test_stream_order_session_deltas_then_one_final(chat):
    events = [e async for e in chat.StreamChat(pb.StreamChatRequest(
        user_id=uid(), message="Tell me a one-line fact about the sea.", options=FAST))]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "session" and kinds[-1] == "final" and kinds.count("final") == 1
    assert "delta" in kinds
    final = events[-1].final
    assert final.usage.completion_tokens > 0
    assert "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta").strip() == final.response


async def test_sessions_are_managed_and_isolated(chat):
    owner, intruder = uid(), uid()
    created = (await chat.CreateSession(pb.CreateSessionRequest(user_id=owner, title="plans"))).session
    r = await chat.Chat(pb.ChatRequest(user_id=owner, session_id=created.session_id, message="Hi!", options=FAST))
    assert r.session_id == created.session_id
    got = (await chat.GetSession(pb.GetSessionRequest(user_id=owner, session_id=created.session_id))).session
    assert got.title == "plans" and got.message_count == 2
    listed = await chat.ListSessions(pb.ListSessionsRequest(user_id=owner))
    assert created.session_id in {s.session_id for s in listed.sessions}
    msgs = await chat.ListSessionMessages(pb.ListSessionMessagesRequest(user_id=owner, session_id=created.session_id))
    assert [m.role for m in msgs.messages] == ["user", "assistant"]

    nf = grpc.StatusCode.NOT_FOUND
    sid = created.session_id
    await expect_error(chat.Chat(pb.ChatRequest(user_id=intruder, session_id=sid, message="hi", options=FAST)), nf)
    await expect_error(chat.GetSession(pb.GetSessionRequest(user_id=intruder, session_id=sid)), nf)
    await expect_error(chat.ListSessionMessages(pb.ListSessionMessagesRequest(user_id=intruder, session_id=sid)), nf)
    await expect_error(chat.DeleteSession(pb.DeleteSessionRequest(user_id=intruder, session_id=sid)), nf)
    assert sid not in {s.session_id for s in (await chat.ListSessions(pb.ListSessionsRequest(user_id=intruder))).sessions}

    deleted = await chat.DeleteSession(pb.DeleteSessionRequest(user_id=owner, session_id=sid))
    assert deleted.deleted_messages == 2
    await expect_error(chat.GetSession(pb.GetSessionRequest(user_id=owner, session_id=sid)), nf)


async def test_bad_input_gets_clear_errors_and_stores_nothing(chat):
    user = uid()
    bad = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(chat.Chat(pb.ChatRequest(user_id=user, message="")), bad, "message", "empty")
    await expect_error(chat.Chat(pb.ChatRequest(user_id=user, message="x" * 40000)), bad, "message", "limit")
    await expect_error(chat.Chat(pb.ChatRequest(user_id="", message="hi")), bad, "user_id")
    await expect_error(chat.Chat(pb.ChatRequest(user_id=user, message="hi", session_id="42")), bad, "session_id", "UUID")
    await expect_error(chat.Chat(pb.ChatRequest(user_id=user, message="hi", session_id=str(uuid.uuid4()))),
                       grpc.StatusCode.NOT_FOUND, "not found")
    await expect_error(chat.Chat(pb.ChatRequest(user_id=user, message="hi", options=pb.ChatOptions(temperature=5))),
                       bad, "temperature")
    await expect_error(chat.Chat(pb.ChatRequest(user_id=user, message="hi",
                                                options=pb.ChatOptions(model="no-such-model"))),
                       grpc.StatusCode.NOT_FOUND, "smollm2-135m-instruct")
    await expect_error(chat.StreamChat(pb.StreamChatRequest(user_id=user, message=" ")).read(), bad, "message")
    await expect_error(chat.GetSession(pb.GetSessionRequest(user_id=user, session_id="nope")), bad, "session_id")
    await expect_error(chat.ListSessions(pb.ListSessionsRequest(user_id=user, page_size=100000)), bad, "page_size")
    await expect_error(chat.ResolveApproval(pb.ResolveApprovalRequest(user_id=user, approval_id=str(uuid.uuid4()),
                                                                      decision=pb.DECISION_APPROVE)),
                       grpc.StatusCode.NOT_FOUND, "approval")
    await expect_error(chat.ResolveApproval(pb.ResolveApprovalRequest(user_id=user, approval_id=str(uuid.uuid4()))),
                       bad, "decision")
    # nothing was stored for this user by the rejected turns
    listed = await chat.ListSessions(pb.ListSessionsRequest(user_id=user))
    assert all(s.message_count == 0 or s.title != "hi" for s in listed.sessions)


async def test_relevant_documents_join_the_context(chat, chat_app):
    from parley.memory.v1 import memory_pb2 as mpb
    from parley.memory.v1 import memory_pb2_grpc
    from parley.runtime.clients import make_channel

    user = uid()
    channel = make_channel(chat_app.address)
    memory = memory_pb2_grpc.MemoryServiceStub(channel)
    await memory.IngestDocument(mpb.IngestDocumentRequest(
        user_id=user, title="Expenses", source="policy.md",
        content="Meal expenses are reimbursed up to 40 euros per day. Taxis need a receipt."))
    await channel.close()
    r = await chat.Chat(pb.ChatRequest(user_id=user, message="How much are meal expenses reimbursed per day?",
                                       options=FAST))
    docs = [m for m in r.memory if m.source == "document"]
    assert docs and "40 euros" in docs[0].content
    unrelated = await chat.Chat(pb.ChatRequest(user_id=user, message="Tell me a joke about cats.", options=FAST))
    assert not [m for m in unrelated.memory if m.source == "document"], "irrelevant passages stay out"
