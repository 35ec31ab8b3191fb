"""gRPC servicer of parley.chat.v1.ChatService: proto <-> domain, nothing else."""

from __future__ import annotations

import dataclasses

from parley.chat.v1 import chat_pb2 as pb
from parley.chat.v1 import chat_pb2_grpc
from parley.memory.v1 import memory_pb2 as mpb
from parley.runtime.protoconv import timestamp
from parley.runtime.validation import invalid
from services.chat.core import ChatCore
from services.chat.events import (
    SessionStarted,
    TextDelta,
    ToolCalled,
    ToolCallRecord,
    ToolFinished,
    TurnFinished,
    TurnOptions,
    TurnRequest,
    TurnResult,
)
from services.chat.peers import ROLE_NAMES


def turn_request(request) -> TurnRequest:
    o = request.options
    return TurnRequest(
        user_id=request.user_id,
        message=request.message,
        session_id=request.session_id,
        request_id=request.request_id,
        options=TurnOptions(
            model=o.model, max_tokens=o.max_tokens,
            temperature=o.temperature if o.HasField("temperature") else None,
            skip_cache=o.skip_cache, disable_tools=o.disable_tools, disable_recall=o.disable_recall,
        ),
    )


def record_pb(r: ToolCallRecord) -> pb.ToolCallRecord:
    return pb.ToolCallRecord(call_id=r.call_id, name=r.name, arguments_json=r.arguments_json,
                             result_json=r.result_json, error=r.error, duration_ms=r.duration_ms)


def response_pb(r: TurnResult) -> pb.ChatResponse:
    u = r.usage
    return pb.ChatResponse(
        response=r.response, model=r.model, tokens_used=u.total_tokens, context_size=r.context_size,
        memory=[pb.MemoryItem(source=m.source, content=m.content, score=m.score, origin_id=m.origin_id,
                              role=m.role, create_time=timestamp(m.created_at)) for m in r.memory],
        session_id=r.session_id, tool_calls=[record_pb(t) for t in r.tool_calls],
        usage=pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                       total_tokens=u.total_tokens, cost_usd=u.cost_usd, priced=u.priced,
                       estimated=u.estimated, model_calls=u.model_calls),
        latency_ms=r.latency_ms, cache_hit=r.cache_hit, provider=r.provider,
        pending_approvals=[pb.PendingApproval(approval_id=p.approval_id, tool_name=p.tool_name,
                                              arguments_json=p.arguments_json) for p in r.pending_approvals],
        message_id=r.message_id, warnings=r.warnings,
    )


def event_pb(event) -> pb.StreamChatResponse:
    if isinstance(event, SessionStarted):
        return pb.StreamChatResponse(session=pb.SessionEvent(session_id=event.session_id))
    if isinstance(event, TextDelta):
        return pb.StreamChatResponse(delta=pb.TextDelta(text=event.text))
    if isinstance(event, ToolCalled):
        return pb.StreamChatResponse(tool_call=pb.ToolCallEvent(
            call_id=event.call_id, name=event.name, arguments_json=event.arguments_json))
    if isinstance(event, ToolFinished):
        return pb.StreamChatResponse(tool_result=pb.ToolResultEvent(record=record_pb(event.record)))
    if isinstance(event, TurnFinished):
        return pb.StreamChatResponse(final=response_pb(event.result))
    raise TypeError(f"unknown turn event {event!r}")


def session_pb(c: mpb.Conversation) -> pb.Session:
    return pb.Session(session_id=c.conversation_id, user_id=c.user_id, title=c.title, create_time=c.create_time,
                      update_time=c.update_time, message_count=c.message_count)


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, core: ChatCore) -> None:
        self.core = core

    async def _authorized(self, context, user_id: str, session_id: str | None = None) -> None:
        self.core.authorize(await self.core.authenticate(context.invocation_metadata()), user_id, session_id)

    async def Chat(self, request, context):
        principal = await self.core.authenticate(context.invocation_metadata())
        final = None
        # Unary: the answer is read whole, so no model call needs to stream it (see AgentState.stream).
        async for event in self.core.run_turn(principal, dataclasses.replace(turn_request(request), stream=False)):
            if isinstance(event, TurnFinished):
                final = event.result
        return response_pb(final)

    async def StreamChat(self, request, context):
        principal = await self.core.authenticate(context.invocation_metadata())
        async for event in self.core.run_turn(principal, turn_request(request)):
            yield event_pb(event)

    # Sessions are memory conversations; the memory service validates and scopes them by user.

    async def CreateSession(self, request, context):
        await self._authorized(context, request.user_id)
        c = await self.core.memory.create_session(request.user_id, request.title)
        return pb.CreateSessionResponse(session=session_pb(c))

    async def GetSession(self, request, context):
        await self._authorized(context, request.user_id, request.session_id)
        c = await self.core.memory.get_session(request.user_id, request.session_id)
        return pb.GetSessionResponse(session=session_pb(c))

    async def ListSessions(self, request, context):
        await self._authorized(context, request.user_id)
        r = await self.core.memory.list_sessions(request.user_id, request.page_size, request.page_token)
        return pb.ListSessionsResponse(sessions=[session_pb(c) for c in r.conversations],
                                       next_page_token=r.next_page_token)

    async def DeleteSession(self, request, context):
        await self._authorized(context, request.user_id, request.session_id)
        deleted = await self.core.memory.delete_session(request.user_id, request.session_id)
        return pb.DeleteSessionResponse(deleted_messages=deleted)

    async def ListSessionMessages(self, request, context):
        await self._authorized(context, request.user_id, request.session_id)
        r = await self.core.memory.list_messages(
            request.user_id, request.session_id, request.page_size, request.page_token)
        return pb.ListSessionMessagesResponse(
            messages=[pb.ChatMessage(message_id=m.message_id, role=ROLE_NAMES.get(m.role, ""), content=m.content,
                                     token_count=m.token_count, create_time=m.create_time) for m in r.messages],
            next_page_token=r.next_page_token)

    async def ResolveApproval(self, request, context):
        if request.decision not in (pb.DECISION_APPROVE, pb.DECISION_DENY):
            raise invalid("decision", "must be DECISION_APPROVE or DECISION_DENY")
        principal = await self.core.authenticate(context.invocation_metadata())
        final = None
        async for event in self.core.resolve_approval(
            principal, request.user_id, request.approval_id, request.decision == pb.DECISION_APPROVE, stream=False
        ):
            if isinstance(event, TurnFinished):
                final = event.result
        return pb.ResolveApprovalResponse(response=response_pb(final))
