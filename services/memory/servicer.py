"""gRPC servicer of parley.memory.v1.MemoryService: proto <-> domain, nothing else."""

from __future__ import annotations

from parley.memory.v1 import memory_pb2 as pb
from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.protoconv import from_struct, from_timestamp, struct, timestamp
from services.memory.core import MemoryCore
from services.memory.records import (
    Chunk,
    Conversation,
    Document,
    Message,
    NewMessage,
    RecallQuery,
    Role,
    ToolCall,
    Visibility,
)
from parley.runtime import validation as v


def conversation_pb(c: Conversation) -> pb.Conversation:
    return pb.Conversation(
        conversation_id=str(c.id), user_id=c.user_id, title=c.title, create_time=timestamp(c.created_at),
        update_time=timestamp(c.updated_at), metadata=struct(c.metadata), summary=c.summary,
        message_count=c.message_count,
    )


def message_pb(m: Message) -> pb.Message:
    return pb.Message(
        message_id=str(m.id), conversation_id=str(m.conversation_id), user_id=m.user_id, role=int(m.role),
        content=m.content, tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
                                       for c in m.tool_calls],
        tool_call_id=m.tool_call_id, token_count=m.token_count, create_time=timestamp(m.created_at),
        metadata=struct(m.metadata), embedded=m.embedded,
    )


def document_pb(d: Document) -> pb.Document:
    return pb.Document(
        document_id=str(d.id), user_id=d.user_id, title=d.title, source=d.source, visibility=int(d.visibility),
        chunk_count=d.chunk_count, create_time=timestamp(d.created_at), metadata=struct(d.metadata),
    )


def chunk_pb(c: Chunk) -> pb.DocumentChunk:
    return pb.DocumentChunk(
        document_id=str(c.document_id), chunk_index=c.chunk_index, content=c.content, title=c.title,
        source=c.source, score=c.score,
    )


def _role(value: int, field: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise v.invalid(field, "must be one of ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL") from None


def _new_message(i: int, m: pb.NewMessage) -> NewMessage:
    return NewMessage(
        role=_role(m.role, f"messages[{i}].role"),
        content=m.content,
        tool_calls=[ToolCall(c.id, c.name, c.arguments_json) for c in m.tool_calls],
        tool_call_id=m.tool_call_id,
        metadata=from_struct(m.metadata),
        message_id=m.message_id,
    )


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, core: MemoryCore) -> None:
        self.core = core

    async def CreateConversation(self, request, context):
        c = await self.core.create_conversation(request.user_id, request.title, from_struct(request.metadata))
        return pb.CreateConversationResponse(conversation=conversation_pb(c))

    async def GetConversation(self, request, context):
        c = await self.core.get_conversation(request.user_id, request.conversation_id)
        return pb.GetConversationResponse(conversation=conversation_pb(c))

    async def ListConversations(self, request, context):
        rows, token = await self.core.list_conversations(request.user_id, request.page_size, request.page_token)
        return pb.ListConversationsResponse(conversations=[conversation_pb(c) for c in rows], next_page_token=token)

    async def UpdateConversation(self, request, context):
        changes = {"title": request.title, "summary": request.summary, "metadata": from_struct(request.metadata)}
        c = await self.core.update_conversation(
            request.user_id, request.conversation_id, changes, list(request.update_mask.paths)
        )
        return pb.UpdateConversationResponse(conversation=conversation_pb(c))

    async def DeleteConversation(self, request, context):
        deleted = await self.core.delete_conversation(request.user_id, request.conversation_id)
        return pb.DeleteConversationResponse(deleted_messages=deleted)

    async def AppendMessages(self, request, context):
        messages = [_new_message(i, m) for i, m in enumerate(request.messages)]
        stored, conversation = await self.core.append_messages(
            request.user_id, request.conversation_id, messages, wait_for_embedding=not request.async_embedding
        )
        return pb.AppendMessagesResponse(messages=[message_pb(m) for m in stored],
                                         conversation=conversation_pb(conversation))

    async def ListMessages(self, request, context):
        rows, token = await self.core.list_messages(
            request.user_id, request.conversation_id, request.page_size, request.page_token, request.token_budget,
            request.last_n,
        )
        return pb.ListMessagesResponse(
            messages=[message_pb(m) for m in rows], next_page_token=token,
            total_tokens=sum(m.token_count for m in rows),
        )

    async def Recall(self, request, context):
        q = RecallQuery(
            user_id=request.user_id,
            vector=[],
            top_k=request.top_k,
            min_score=request.min_score,
            conversation_ids=[v.uuid_id(c, f"conversation_ids[{i}]") for i, c in enumerate(request.conversation_ids)],
            roles=[_role(r, f"roles[{i}]") for i, r in enumerate(request.roles)],
            start_time=from_timestamp(request, "start_time"),
            end_time=from_timestamp(request, "end_time"),
            exclude_ids=[v.uuid_id(m, f"exclude_message_ids[{i}]") for i, m in enumerate(request.exclude_message_ids)],
            exclude_recent_conversation=v.optional_uuid(
                request.exclude_recent_conversation_id, "exclude_recent_conversation_id"
            ),
            exclude_recent_count=request.exclude_recent_count,
        )
        hits = await self.core.recall(request.query, q)
        return pb.RecallResponse(results=[pb.RecalledMessage(message=message_pb(m), score=s) for m, s in hits])

    async def IngestDocument(self, request, context):
        visibility = Visibility.SHARED if request.visibility == pb.VISIBILITY_SHARED else Visibility.PRIVATE
        d = await self.core.ingest_document(
            request.user_id, request.title, request.source, request.content, visibility,
            from_struct(request.metadata), request.chunk_tokens, request.chunk_overlap,
        )
        return pb.IngestDocumentResponse(document=document_pb(d))

    async def ListDocuments(self, request, context):
        rows, token = await self.core.list_documents(request.user_id, request.page_size, request.page_token)
        return pb.ListDocumentsResponse(documents=[document_pb(d) for d in rows], next_page_token=token)

    async def DeleteDocument(self, request, context):
        deleted = await self.core.delete_document(request.user_id, request.document_id)
        return pb.DeleteDocumentResponse(deleted_chunks=deleted)

    async def SearchDocuments(self, request, context):
        chunks = await self.core.search_documents(request.user_id, request.query, request.top_k)
        return pb.SearchDocumentsResponse(chunks=[chunk_pb(c) for c in chunks])

    async def DeleteUserData(self, request, context):
        conversations, messages, documents = await self.core.delete_user(request.user_id)
        return pb.DeleteUserDataResponse(
            deleted_conversations=conversations, deleted_messages=messages, deleted_documents=documents
        )
