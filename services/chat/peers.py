"""Adapters from the chat domain to the other Parley services (over gRPC)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from parley.inference.v1 import inference_pb2 as ipb
from parley.memory.v1 import memory_pb2 as mpb
from parley.runtime.clients import Client
from parley.runtime.protoconv import struct
from parley.tools.v1 import tools_pb2 as tpb

ROLE_NAMES = {1: "system", 2: "user", 3: "assistant", 4: "tool"}
ROLE_VALUES = {name: value for value, name in ROLE_NAMES.items()}


@dataclass
class PromptMessage:
    """One message of a prompt; `role` is system/user/assistant/tool."""

    role: str
    content: str
    tool_calls: list[tuple[str, str, str]] | None = None  # (id, name, arguments_json)
    tool_call_id: str = ""
    name: str = ""
    message_id: str = ""
    token_count: int = 0  # as the memory service counted it (0: not stored yet)

    def to_inference(self) -> ipb.Message:
        return ipb.Message(
            role=ROLE_VALUES[self.role],
            content=self.content,
            tool_calls=[ipb.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in self.tool_calls or ()],
            tool_call_id=self.tool_call_id,
            name=self.name,
        )

    def to_memory(self) -> mpb.NewMessage:
        return mpb.NewMessage(
            role=ROLE_VALUES[self.role],
            content=self.content,
            tool_calls=[mpb.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in self.tool_calls or ()],
            tool_call_id=self.tool_call_id,
            # chosen by the chat service (here, unless the turn chose it already), so that a retry of the call
            # (gRPC's retry policy resends it) cannot store it twice
            message_id=self.message_id or str(uuid.uuid4()),
        )

    @classmethod
    def from_memory(cls, m: mpb.Message) -> PromptMessage:
        return cls(
            role=ROLE_NAMES.get(m.role, "user"),
            content=m.content,
            tool_calls=[(c.id, c.name, c.arguments_json) for c in m.tool_calls] or None,
            tool_call_id=m.tool_call_id,
            message_id=m.message_id,
            token_count=m.token_count,
        )


class MemoryPeer:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def create_session(self, user_id: str, title: str = "") -> mpb.Conversation:
        r = await self.client.call("CreateConversation", mpb.CreateConversationRequest(user_id=user_id, title=title))
        return r.conversation

    async def get_session(self, user_id: str, session_id: str) -> mpb.Conversation:
        r = await self.client.call(
            "GetConversation", mpb.GetConversationRequest(user_id=user_id, conversation_id=session_id)
        )
        return r.conversation

    async def append(self, user_id: str, session_id: str,
                     messages: list[PromptMessage]) -> tuple[list[mpb.Message], mpb.Conversation]:
        """Store messages (NOT_FOUND unless the session is the user's); them, and the session as they left it."""
        r = await self.client.call(
            "AppendMessages",
            mpb.AppendMessagesRequest(
                user_id=user_id, conversation_id=session_id, messages=[m.to_memory() for m in messages],
                async_embedding=True,  # recall of this turn's messages is only needed from the next turn on
            ),
        )
        return list(r.messages), r.conversation

    async def history(self, user_id: str, session_id: str, token_budget: int) -> list[PromptMessage]:
        r = await self.client.call(
            "ListMessages",
            mpb.ListMessagesRequest(
                user_id=user_id, conversation_id=session_id, token_budget=token_budget, page_size=1000
            ),
        )
        return [PromptMessage.from_memory(m) for m in r.messages]

    async def last_messages(self, user_id: str, session_id: str, n: int) -> list[mpb.Message]:
        """The session's `n` newest messages (n <= MAX_PAGE_SIZE), oldest first."""
        r = await self.client.call(
            "ListMessages", mpb.ListMessagesRequest(user_id=user_id, conversation_id=session_id, last_n=n)
        )
        return list(r.messages)

    async def recall(
        self, user_id: str, query: str, top_k: int, min_score: float, exclude_ids: list[str]
    ) -> list[mpb.RecalledMessage]:
        r = await self.client.call(
            "Recall",
            mpb.RecallRequest(
                user_id=user_id, query=query, top_k=top_k, min_score=min_score, exclude_message_ids=exclude_ids
            ),
        )
        return list(r.results)

    async def search_documents(self, user_id: str, query: str, top_k: int) -> list[mpb.DocumentChunk]:
        r = await self.client.call("SearchDocuments", mpb.SearchDocumentsRequest(user_id=user_id, query=query,
                                                                                top_k=top_k))
        return list(r.chunks)

    async def list_sessions(self, user_id: str, page_size: int, page_token: str) -> mpb.ListConversationsResponse:
        return await self.client.call(
            "ListConversations",
            mpb.ListConversationsRequest(user_id=user_id, page_size=page_size, page_token=page_token),
        )

    async def delete_session(self, user_id: str, session_id: str) -> int:
        r = await self.client.call(
            "DeleteConversation", mpb.DeleteConversationRequest(user_id=user_id, conversation_id=session_id)
        )
        return r.deleted_messages

    async def list_messages(
        self, user_id: str, session_id: str, page_size: int, page_token: str
    ) -> mpb.ListMessagesResponse:
        return await self.client.call(
            "ListMessages",
            mpb.ListMessagesRequest(
                user_id=user_id, conversation_id=session_id, page_size=page_size, page_token=page_token
            ),
        )

    async def update_summary(self, user_id: str, session_id: str, summary: str, metadata: dict) -> None:
        request = mpb.UpdateConversationRequest(
            user_id=user_id, conversation_id=session_id, summary=summary, metadata=struct(metadata)
        )
        request.update_mask.paths.extend(["summary", "metadata"])
        await self.client.call("UpdateConversation", request)


class InferencePeer:
    def __init__(self, client: Client) -> None:
        self.client = client

    @staticmethod
    def request(
        model: str, messages: list[PromptMessage], tools: list[tpb.Tool], max_tokens: int,
        temperature: float | None, tool_choice: int = ipb.TOOL_CHOICE_UNSPECIFIED, forced_tool: str = "",
    ) -> ipb.StreamGenerateRequest:
        sampling = ipb.SamplingParams(max_tokens=max_tokens)
        if temperature is not None:
            sampling.temperature = temperature
        return ipb.StreamGenerateRequest(
            model=model,
            messages=[m.to_inference() for m in messages],
            tools=[ipb.ToolDefinition(name=t.name, description=t.description, parameters=t.parameters_schema)
                   for t in tools],
            tool_choice=tool_choice,
            forced_tool=forced_tool,
            sampling=sampling,
        )

    def stream(self, request: ipb.StreamGenerateRequest) -> AsyncIterator[ipb.StreamGenerateResponse]:
        return self.client.stream("StreamGenerate", request)

    async def generate(self, request: ipb.StreamGenerateRequest) -> ipb.GenerateResponse:
        unary = ipb.GenerateRequest()
        unary.MergeFromString(request.SerializeToString())  # same field numbers by design
        return await self.client.call("Generate", unary)


class ToolsPeer:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def list_tools(self) -> list[tpb.Tool]:
        tools: list[tpb.Tool] = []
        token = ""
        while True:
            r = await self.client.call("ListTools", tpb.ListToolsRequest(page_size=1000, page_token=token))
            tools.extend(r.tools)
            token = r.next_page_token
            if not token:
                return tools

    async def execute(self, user_id: str, name: str, arguments: dict, call_id: str,
                      timeout_s: float | None = None) -> tpb.ToolResult:
        """Run a tool; the deadline outlasts the tool's own limit so a slow tool is a result, not an RPC error."""
        r = await self.client.call(
            "ExecuteTool",
            tpb.ExecuteToolRequest(name=name, user_id=user_id, arguments=struct(arguments), call_id=call_id),
            timeout_s=timeout_s,
        )
        return r.result

