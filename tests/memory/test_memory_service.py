"""The memory service over real gRPC, real PostgreSQL+pgvector and the real embedding model."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text

from parley.memory.v1 import memory_pb2 as pb
from parley.runtime.db import Database


def uid() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


async def new_conversation(memory, user: str, title: str = "") -> str:
    r = await memory.CreateConversation(pb.CreateConversationRequest(user_id=user, title=title))
    return r.conversation.conversation_id


async def append(memory, user: str, cid: str, *pairs: tuple[int, str]):
    return await memory.AppendMessages(pb.AppendMessagesRequest(
        user_id=user, conversation_id=cid, messages=[pb.NewMessage(role=r, content=c) for r, c in pairs]))


async def expect_error(awaitable, code: grpc.StatusCode, *fragments: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    for fragment in fragments:
        assert fragment in err.details(), err.details()
    return err


async def count(database_url: str, sql: str, **params) -> int:
    db = Database(database_url)
    try:
        async with db.engine.connect() as conn:
            return int((await conn.execute(text(sql), params)).scalar_one())
    finally:
        await db.close()


# -- conversations and messages -------------------------------------------------------------------


async def test_append_is_ordered_counted_and_embedded(memory):
    user = uid()
    cid = await new_conversation(memory, user, "first")
    r = await append(memory, user, cid, (pb.ROLE_USER, "I live in Lisbon."), (pb.ROLE_ASSISTANT, "Lisbon is lovely."))
    assert [m.content for m in r.messages] == ["I live in Lisbon.", "Lisbon is lovely."]
    assert all(m.embedded and m.token_count > 0 for m in r.messages)
    conv = (await memory.GetConversation(pb.GetConversationRequest(user_id=user, conversation_id=cid))).conversation
    assert conv.message_count == 2 and conv.title == "first"
    assert r.conversation == conv, "the append answers with the conversation as it left it"
    again = await append(memory, user, cid, (pb.ROLE_USER, "And I work in Porto."))
    assert (again.conversation.message_count, again.conversation.user_id) == (3, user)
    assert again.conversation.update_time.ToDatetime() >= conv.update_time.ToDatetime()


async def test_a_retried_append_with_its_message_ids_stores_nothing_twice(memory, database_url):
    user, other = uid(), uid()
    cid = await new_conversation(memory, user)
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    request = pb.AppendMessagesRequest(user_id=user, conversation_id=cid, messages=[
        pb.NewMessage(role=pb.ROLE_USER, content="My cat is called Miso.", message_id=ids[0]),
        pb.NewMessage(role=pb.ROLE_ASSISTANT, content="Miso is a lovely name.", message_id=ids[1])])
    first = await memory.AppendMessages(request)
    assert [m.message_id for m in first.messages] == ids
    # The retry (e.g. the answer to the first call was lost), and two more racing each other: the same answer.
    again = [await memory.AppendMessages(request), *await asyncio.gather(*(memory.AppendMessages(request)
                                                                           for _ in range(2)))]
    for r in again:
        assert [(m.message_id, m.content, m.create_time) for m in r.messages] == \
            [(m.message_id, m.content, m.create_time) for m in first.messages]
        assert r.conversation.message_count == 2
    assert await count(database_url, "SELECT count(*) FROM messages WHERE conversation_id = :c",
                       c=uuid.UUID(cid)) == 2
    listed = await memory.ListMessages(pb.ListMessagesRequest(user_id=user, conversation_id=cid))
    assert [m.message_id for m in listed.messages] == ids

    # An id used by another message (here: of the same turn, in a new one) is refused; nothing is stored.
    mixed = pb.AppendMessagesRequest(user_id=user, conversation_id=cid, messages=[
        pb.NewMessage(role=pb.ROLE_USER, content="A new message.", message_id=str(uuid.uuid4())),
        pb.NewMessage(role=pb.ROLE_USER, content="Reusing an id.", message_id=ids[0])])
    await expect_error(memory.AppendMessages(mixed), grpc.StatusCode.ALREADY_EXISTS, "message_id")
    # Someone else's conversation stays NOT_FOUND, even with ids that exist.
    other_cid = await new_conversation(memory, other)
    await expect_error(memory.AppendMessages(pb.AppendMessagesRequest(
        user_id=user, conversation_id=other_cid, messages=request.messages)), grpc.StatusCode.NOT_FOUND)
    # Bad ids: not a UUID, or twice in one call.
    await expect_error(memory.AppendMessages(pb.AppendMessagesRequest(user_id=user, conversation_id=cid, messages=[
        pb.NewMessage(role=pb.ROLE_USER, content="x", message_id="not-a-uuid")])),
        grpc.StatusCode.INVALID_ARGUMENT, "messages[0].message_id")
    twice = str(uuid.uuid4())
    await expect_error(memory.AppendMessages(pb.AppendMessagesRequest(user_id=user, conversation_id=cid, messages=[
        pb.NewMessage(role=pb.ROLE_USER, content="x", message_id=twice),
        pb.NewMessage(role=pb.ROLE_USER, content="y", message_id=twice)])),
        grpc.StatusCode.INVALID_ARGUMENT, "message_id")
    assert await count(database_url, "SELECT count(*) FROM messages WHERE user_id IN (:u, :o)", u=user, o=other) == 2
    conv = (await memory.GetConversation(pb.GetConversationRequest(user_id=user, conversation_id=cid))).conversation
    assert conv.message_count == 2


async def test_tool_messages_round_trip(memory):
    user = uid()
    cid = await new_conversation(memory, user)
    await memory.AppendMessages(pb.AppendMessagesRequest(user_id=user, conversation_id=cid, messages=[
        pb.NewMessage(role=pb.ROLE_ASSISTANT, content="", tool_calls=[
            pb.ToolCall(id="call_1", name="sales_report", arguments_json='{"period":"last_month"}')]),
        pb.NewMessage(role=pb.ROLE_TOOL, content='{"deals": 12}', tool_call_id="call_1"),
    ]))
    listed = await memory.ListMessages(pb.ListMessagesRequest(user_id=user, conversation_id=cid))
    assert listed.messages[0].tool_calls[0].name == "sales_report"
    assert listed.messages[1].tool_call_id == "call_1"


async def test_history_pages_and_token_budget(memory):
    user = uid()
    cid = await new_conversation(memory, user)
    for i in range(7):
        await append(memory, user, cid, (pb.ROLE_USER, f"message number {i}"))
    seen, token = [], ""
    while True:
        page = await memory.ListMessages(pb.ListMessagesRequest(
            user_id=user, conversation_id=cid, page_size=3, page_token=token))
        seen += [m.content for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"message number {i}" for i in range(7)]
    per_message = page.messages[-1].token_count
    recent = await memory.ListMessages(pb.ListMessagesRequest(
        user_id=user, conversation_id=cid, token_budget=per_message * 3))
    assert [m.content for m in recent.messages] == [f"message number {i}" for i in (4, 5, 6)]
    assert recent.total_tokens <= per_message * 3
    last = await memory.ListMessages(pb.ListMessagesRequest(user_id=user, conversation_id=cid, last_n=2))
    assert [m.content for m in last.messages] == ["message number 5", "message number 6"]


async def test_list_conversations_pages_newest_first(memory):
    user = uid()
    ids = [await new_conversation(memory, user, f"c{i}") for i in range(5)]
    first = await memory.ListConversations(pb.ListConversationsRequest(user_id=user, page_size=2))
    assert [c.conversation_id for c in first.conversations] == ids[::-1][:2]
    rest = await memory.ListConversations(pb.ListConversationsRequest(
        user_id=user, page_size=10, page_token=first.next_page_token))
    assert [c.conversation_id for c in rest.conversations] == ids[::-1][2:]
    assert rest.next_page_token == ""


async def test_update_conversation_summary(memory):
    user = uid()
    cid = await new_conversation(memory, user)
    req = pb.UpdateConversationRequest(user_id=user, conversation_id=cid, summary="Ana likes tea", title="ignored")
    req.update_mask.paths.append("summary")
    conv = (await memory.UpdateConversation(req)).conversation
    assert conv.summary == "Ana likes tea" and conv.title == ""


# -- recall -----------------------------------------------------------------------------------------


async def test_recall_across_sessions_with_filters(memory):
    user = uid()
    old = await new_conversation(memory, user)
    await append(memory, user, old, (pb.ROLE_USER, "My dog is called Biscuit and he loves the beach."))
    await append(memory, user, old, (pb.ROLE_ASSISTANT, "Biscuit sounds like a happy dog."))
    other = await new_conversation(memory, user)
    await append(memory, user, other, (pb.ROLE_USER, "I am learning to play the cello."))
    current = await new_conversation(memory, user)
    now_msgs = await append(memory, user, current, (pb.ROLE_USER, "What is my dog's name?"))

    r = await memory.Recall(pb.RecallRequest(user_id=user, query="what is my dog called", top_k=3,
                                             exclude_message_ids=[m.message_id for m in now_msgs.messages]))
    assert r.results[0].message.content.startswith("My dog is called Biscuit")
    assert r.results[0].message.conversation_id == old
    assert all(m.message.conversation_id != current for m in r.results)
    scores = [h.score for h in r.results]
    assert scores == sorted(scores, reverse=True)

    only_user = await memory.Recall(pb.RecallRequest(user_id=user, query="dog", roles=[pb.ROLE_ASSISTANT]))
    assert {h.message.role for h in only_user.results} == {pb.ROLE_ASSISTANT}
    in_other = await memory.Recall(pb.RecallRequest(user_id=user, query="dog", conversation_ids=[other]))
    assert {h.message.conversation_id for h in in_other.results} == {other}
    strict = await memory.Recall(pb.RecallRequest(user_id=user, query="dog", min_score=0.99))
    assert list(strict.results) == []
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    assert list((await memory.Recall(pb.RecallRequest(user_id=user, query="dog", start_time=future))).results) == []


async def test_recall_never_crosses_users(memory):
    alice, bob = uid(), uid()
    await append(memory, alice, await new_conversation(memory, alice), (pb.ROLE_USER, "My secret code is 4471."))
    r = await memory.Recall(pb.RecallRequest(user_id=bob, query="secret code", top_k=50))
    assert all(h.message.user_id == bob for h in r.results)
    assert "4471" not in " ".join(h.message.content for h in r.results)


# -- documents ----------------------------------------------------------------------------------------

HANDBOOK = """# Travel policy

Employees book flights through the travel desk. Economy class is the default for flights under six hours.

## Expenses

Meals are reimbursed up to 40 euros per day. Keep every receipt and submit expenses within 30 days.

## Equipment

Laptops are replaced every three years. Lost equipment must be reported to IT security within 24 hours.
"""


async def test_documents_ingest_chunk_and_hybrid_search(memory):
    user = uid()
    doc = (await memory.IngestDocument(pb.IngestDocumentRequest(
        user_id=user, title="Handbook", source="handbook.md", content=HANDBOOK * 3, chunk_tokens=48,
        chunk_overlap=8))).document
    assert doc.chunk_count > 3
    hits = (await memory.SearchDocuments(pb.SearchDocumentsRequest(
        user_id=user, query="how much can I spend on meals per day?", top_k=3))).chunks
    assert hits and "40 euros" in hits[0].content
    assert hits[0].source == "handbook.md" and hits[0].title == "Handbook"
    exact = (await memory.SearchDocuments(pb.SearchDocumentsRequest(user_id=user, query="IT security"))).chunks
    assert "IT security" in exact[0].content


async def test_documents_private_shared_and_deleted(memory):
    owner, other = uid(), uid()
    private = (await memory.IngestDocument(pb.IngestDocumentRequest(
        user_id=owner, title="Private", content="The vault combination is kept by Marta."))).document
    shared = (await memory.IngestDocument(pb.IngestDocumentRequest(
        user_id=owner, title="Shared", content="The office opens at eight o'clock.",
        visibility=pb.VISIBILITY_SHARED))).document
    seen = (await memory.SearchDocuments(pb.SearchDocumentsRequest(user_id=other, query="vault combination"))).chunks
    assert private.document_id not in {c.document_id for c in seen}
    seen = (await memory.SearchDocuments(pb.SearchDocumentsRequest(user_id=other, query="office opens"))).chunks
    assert shared.document_id in {c.document_id for c in seen}
    listed = (await memory.ListDocuments(pb.ListDocumentsRequest(user_id=other, page_size=1000))).documents
    assert private.document_id not in {d.document_id for d in listed}
    await expect_error(memory.DeleteDocument(pb.DeleteDocumentRequest(user_id=other, document_id=shared.document_id)),
                       grpc.StatusCode.NOT_FOUND)
    r = await memory.DeleteDocument(pb.DeleteDocumentRequest(user_id=owner, document_id=private.document_id))
    assert r.deleted_chunks == 1
    seen = (await memory.SearchDocuments(pb.SearchDocumentsRequest(user_id=owner, query="vault combination"))).chunks
    assert private.document_id not in {c.document_id for c in seen}


# -- deletion -----------------------------------------------------------------------------------------


async def test_delete_conversation_removes_messages_and_vectors(memory, database_url):
    user = uid()
    cid = await new_conversation(memory, user)
    await append(memory, user, cid, (pb.ROLE_USER, "delete me please"), (pb.ROLE_ASSISTANT, "ok"))
    r = await memory.DeleteConversation(pb.DeleteConversationRequest(user_id=user, conversation_id=cid))
    assert r.deleted_messages == 2
    assert await count(database_url, "SELECT count(*) FROM messages WHERE conversation_id = :c", c=uuid.UUID(cid)) == 0
    await expect_error(memory.GetConversation(pb.GetConversationRequest(user_id=user, conversation_id=cid)),
                       grpc.StatusCode.NOT_FOUND, "not found")


async def test_delete_user_removes_everything_of_theirs_only(memory, database_url):
    user, bystander = uid(), uid()
    for u in (user, bystander):
        cid = await new_conversation(memory, u)
        await append(memory, u, cid, (pb.ROLE_USER, "hello"))
        await memory.IngestDocument(pb.IngestDocumentRequest(user_id=u, content="some notes"))
    r = await memory.DeleteUserData(pb.DeleteUserDataRequest(user_id=user))
    assert (r.deleted_conversations, r.deleted_messages, r.deleted_documents) == (1, 1, 1)
    for table in ("conversations", "messages", "documents", "document_chunks"):
        assert await count(database_url, f"SELECT count(*) FROM {table} WHERE user_id = :u", u=user) == 0
        assert await count(database_url, f"SELECT count(*) FROM {table} WHERE user_id = :u", u=bystander) == 1


# -- isolation on every RPC -----------------------------------------------------------------------------


async def test_no_rpc_touches_another_users_conversation(memory, database_url):
    owner, intruder = uid(), uid()
    cid = await new_conversation(memory, owner)
    await append(memory, owner, cid, (pb.ROLE_USER, "owner's private message"))
    nf = grpc.StatusCode.NOT_FOUND
    await expect_error(memory.GetConversation(pb.GetConversationRequest(user_id=intruder, conversation_id=cid)), nf)
    await expect_error(memory.ListMessages(pb.ListMessagesRequest(user_id=intruder, conversation_id=cid)), nf)
    await expect_error(append(memory, intruder, cid, (pb.ROLE_USER, "injected")), nf)
    upd = pb.UpdateConversationRequest(user_id=intruder, conversation_id=cid, title="pwned")
    upd.update_mask.paths.append("title")
    await expect_error(memory.UpdateConversation(upd), nf)
    await expect_error(memory.DeleteConversation(pb.DeleteConversationRequest(user_id=intruder, conversation_id=cid)), nf)
    listed = await memory.ListConversations(pb.ListConversationsRequest(user_id=intruder))
    assert cid not in {c.conversation_id for c in listed.conversations}
    recalled = await memory.Recall(pb.RecallRequest(user_id=intruder, query="private message", conversation_ids=[cid]))
    assert list(recalled.results) == []
    await memory.DeleteUserData(pb.DeleteUserDataRequest(user_id=intruder))
    assert await count(database_url, "SELECT count(*) FROM messages WHERE conversation_id = :c", c=uuid.UUID(cid)) == 1
    conv = (await memory.GetConversation(pb.GetConversationRequest(user_id=owner, conversation_id=cid))).conversation
    assert conv.message_count == 1 and conv.title == ""


# -- bad input ----------------------------------------------------------------------------------------------

BAD = grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_input_is_rejected_with_clear_messages_and_nothing_stored(memory, database_url):
    user = uid()
    cid = await new_conversation(memory, user)
    err = await expect_error(append(memory, user, cid, (pb.ROLE_USER, "   ")), BAD, "messages[0].content", "empty")
    status = rpc_status.from_call(err)
    violations = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    assert violations, "a BadRequest detail names the field"
    await expect_error(append(memory, user, cid, (pb.ROLE_USER, "x" * 40000)), BAD, "limit is 32768")
    await expect_error(append(memory, user, cid, (pb.ROLE_UNSPECIFIED, "hi")), BAD, "role")
    await expect_error(append(memory, user, cid, (pb.ROLE_TOOL, "result")), BAD, "tool_call_id")
    # one bad message in a turn: the good one before it is not stored either
    await expect_error(append(memory, user, cid, (pb.ROLE_USER, "fine"), (pb.ROLE_USER, "")), BAD, "messages[1]")
    await expect_error(memory.AppendMessages(pb.AppendMessagesRequest(user_id=user, conversation_id=cid)),
                       BAD, "at least one")
    assert await count(database_url, "SELECT count(*) FROM messages WHERE conversation_id = :c", c=uuid.UUID(cid)) == 0
    await expect_error(memory.GetConversation(pb.GetConversationRequest(user_id=user, conversation_id="nope")),
                       BAD, "conversation_id", "not a valid UUID")
    await expect_error(memory.GetConversation(pb.GetConversationRequest(user_id="", conversation_id=cid)),
                       BAD, "user_id", "required")
    await expect_error(memory.CreateConversation(pb.CreateConversationRequest(user_id="bad user!")), BAD, "user_id")
    await expect_error(memory.GetConversation(pb.GetConversationRequest(user_id=user, conversation_id=str(uuid.uuid4()))),
                       grpc.StatusCode.NOT_FOUND, "not found")
    await expect_error(memory.ListConversations(pb.ListConversationsRequest(user_id=user, page_size=5000)),
                       BAD, "page_size", "at most 1000")
    await expect_error(memory.ListConversations(pb.ListConversationsRequest(user_id=user, page_size=-1)), BAD)
    await expect_error(memory.ListConversations(pb.ListConversationsRequest(user_id=user, page_token="garbage!")),
                       BAD, "page_token")
    page = await memory.ListConversations(pb.ListConversationsRequest(user_id=user, page_size=1))
    await new_conversation(memory, user)
    page = await memory.ListConversations(pb.ListConversationsRequest(user_id=user, page_size=1))
    await expect_error(memory.ListConversations(pb.ListConversationsRequest(
        user_id=uid(), page_size=1, page_token=page.next_page_token)), BAD, "does not belong")
    await expect_error(memory.ListMessages(pb.ListMessagesRequest(user_id=user, conversation_id=cid, last_n=5000)),
                       BAD, "last_n")
    await expect_error(memory.Recall(pb.RecallRequest(user_id=user, query="")), BAD, "query")
    await expect_error(memory.Recall(pb.RecallRequest(user_id=user, query="x", top_k=1000)), BAD, "top_k")
    await expect_error(memory.Recall(pb.RecallRequest(user_id=user, query="x", min_score=2)), BAD, "min_score")
    await expect_error(memory.IngestDocument(pb.IngestDocumentRequest(user_id=user, content="")), BAD, "content")
    await expect_error(memory.IngestDocument(pb.IngestDocumentRequest(
        user_id=user, content="text", chunk_tokens=64, chunk_overlap=64)), BAD, "chunk_overlap")
    await expect_error(memory.SearchDocuments(pb.SearchDocumentsRequest(user_id=user, query="")), BAD, "query")
    upd = pb.UpdateConversationRequest(user_id=user, conversation_id=cid)
    await expect_error(memory.UpdateConversation(upd), BAD, "update_mask")
    upd.update_mask.paths.append("user_id")
    await expect_error(memory.UpdateConversation(upd), BAD, "cannot update user_id")
    # the server is still up and well
    assert (await memory.GetConversation(pb.GetConversationRequest(user_id=user, conversation_id=cid))).conversation


async def test_async_embedding_returns_at_commit_and_fills_in_after(memory):
    import asyncio

    user = uid()
    cid = await new_conversation(memory, user)
    r = await memory.AppendMessages(pb.AppendMessagesRequest(
        user_id=user, conversation_id=cid, async_embedding=True,
        messages=[pb.NewMessage(role=pb.ROLE_USER, content="I keep my bike in the blue shed.")]))
    assert r.messages[0].message_id and r.messages[0].token_count > 0
    for _ in range(100):  # the vector follows within moments
        hits = await memory.Recall(pb.RecallRequest(user_id=user, query="where is my bike?"))
        if hits.results:
            break
        await asyncio.sleep(0.05)
    assert hits.results and hits.results[0].message.message_id == r.messages[0].message_id
