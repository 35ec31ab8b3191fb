"""The chat turn: persist, assemble context, run the agent, persist, account.

`ChatCore.run_turn` is an async generator of `TurnEvent`s; the unary Chat RPC simply
keeps the final one. The user's message is stored before any model is called, so a
crash after that point loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from parley.runtime import validation as v
from parley.runtime.config import ChatSettings
from parley.runtime.errors import NotFound, ParleyError
from parley.runtime.logging import get_logger
from services.chat.agent import Agent, AgentState
from services.chat.approvals import ApprovalStore
from services.chat.events import (
    MemoryItem,
    SessionStarted,
    TurnEvent,
    TurnFinished,
    TurnRequest,
    TurnResult,
)
from services.chat.peers import MemoryPeer, PromptMessage

_log = get_logger(__name__)


@dataclass
class AssembledContext:
    messages: list[PromptMessage]
    memory: list[MemoryItem]
    warnings: list[str]


class ChatCore:
    def __init__(self, settings: ChatSettings, memory: MemoryPeer, agent: Agent, approvals: ApprovalStore) -> None:
        self.settings = settings
        self.memory = memory
        self.agent = agent
        self.approvals = approvals

    # -- validation ----------------------------------------------------------------------------

    def validate(self, req: TurnRequest) -> None:
        v.user_id(req.user_id)
        v.text(req.message, "message", self.settings.max_message_chars)
        v.optional_uuid(req.session_id, "session_id")
        if len(req.request_id) > 128:
            raise v.invalid("request_id", "must be at most 128 characters")
        if req.options.max_tokens < 0:
            raise v.invalid("options.max_tokens", "must not be negative")
        if req.options.temperature is not None and not 0 <= req.options.temperature <= 2:
            raise v.invalid("options.temperature", "must be between 0 and 2")

    @staticmethod
    def session_ids(user_id: str, session_id: str) -> None:
        v.user_id(user_id)
        v.uuid_id(session_id, "session_id")

    # -- a turn --------------------------------------------------------------------------------

    async def run_turn(self, req: TurnRequest) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        self.validate(req)
        if req.session_id:
            session = await self.memory.get_session(req.user_id, req.session_id)  # NOT_FOUND if not the user's
        else:
            session = await self.memory.create_session(req.user_id, title=req.message[:80])
        session_id = session.conversation_id
        yield SessionStarted(session_id)

        # Persist the user's message before calling any model.
        await self.memory.append(req.user_id, session_id, [PromptMessage("user", req.message)])
        ctx = await self.assemble(req, session_id, session.summary)
        state = AgentState(
            messages=ctx.messages, question=req.message, model=req.options.model,
            max_tokens=req.options.max_tokens, temperature=req.options.temperature,
            use_tools=not req.options.disable_tools,
        )
        async for event in self.agent.run(state, req.user_id, ctx.warnings):
            yield event
        result = await self._finish(req.user_id, session_id, req.message, state, ctx.memory, ctx.warnings, started)
        yield TurnFinished(result)

    async def resolve_approval(self, user_id: str, approval_id: str, approve: bool) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        v.user_id(user_id)
        aid = v.uuid_id(approval_id, "approval_id")
        paused = await self.approvals.take(user_id, aid)
        if paused is None:
            raise NotFound(message=f"approval {approval_id} not found (unknown, expired or already resolved)")
        state = AgentState.from_json(paused.state_json)
        warnings: list[str] = []
        yield SessionStarted(paused.session_id)
        async for event in self.agent.resume(state, user_id, approve, warnings):
            yield event
        yield TurnFinished(await self._finish(user_id, paused.session_id, state.question, state, [], warnings, started))

    async def _finish(self, user_id: str, session_id: str, prompt: str, state: AgentState,
                      memory: list[MemoryItem], warnings: list[str], started: float) -> TurnResult:
        """Persist what the turn produced (one atomic append) and build the result."""
        answer = state.text.strip()
        to_store = list(state.transcript)
        if state.pending:
            await self.approvals.save(state.pending[0].approval_id, user_id, session_id, state.to_json())
        else:
            to_store.append(PromptMessage("assistant", answer or "(no answer)"))
        stored = await self.memory.append(user_id, session_id, to_store) if to_store else []
        state.transcript = []
        result = TurnResult(
            response=answer, model=state.served_model, session_id=session_id, context_size=state.context_size,
            memory=memory, tool_calls=state.records, usage=state.usage, provider=state.provider,
            pending_approvals=state.pending, message_id=stored[-1].message_id if stored and not state.pending else "",
            warnings=warnings, latency_ms=(time.perf_counter() - started) * 1000,
        )
        _log.info(
            "turn", user_id=user_id, session_id=session_id, prompt=prompt[:200],
            tokens_used=state.usage.total_tokens, time_ms=round(result.latency_ms, 1),
            tool_called=",".join(r.name for r in state.records) or None, model=state.served_model,
            cost=state.usage.cost_usd if state.usage.priced else None, cache_hit=False,
        )
        return result

    async def assemble(self, req: TurnRequest, session_id: str, summary: str) -> AssembledContext:
        """System prompt + summary + recalled memories + the recent window (which ends with this message)."""
        history = await self.memory.history(req.user_id, session_id, self.settings.history_token_budget)
        warnings: list[str] = []
        memory: list[MemoryItem] = []
        if self.settings.recall_top_k and not req.options.disable_recall:
            try:
                hits = await self.memory.recall(
                    req.user_id, req.message, self.settings.recall_top_k, self.settings.recall_min_score,
                    [m.message_id for m in history if m.message_id],
                )
                memory = [
                    MemoryItem(
                        source="message", content=h.message.content, score=h.score,
                        origin_id=h.message.conversation_id, role=_role_name(h.message.role),
                        created_at=h.message.create_time.ToDatetime() if h.message.HasField("create_time") else None,
                    )
                    for h in hits
                ]
            except ParleyError as exc:  # answer without recall, and say so
                _log.warning("recall_failed", error=exc.message)
                warnings.append("recall unavailable: answered without memories of past sessions")
        system = self.settings.system_prompt
        if summary:
            system += f"\n\nSummary of the earlier conversation:\n{summary}"
        if memory:
            lines = "\n".join(f"- ({m.role}) {m.content}" for m in memory)
            system += f"\n\nFrom earlier conversations with this user:\n{lines}"
        window = [m for m in history if m.role in ("user", "assistant") and m.content]
        return AssembledContext([PromptMessage("system", system), *window], memory, warnings)


def _role_name(role: int) -> str:
    return {1: "system", 2: "user", 3: "assistant", 4: "tool"}.get(role, "user")
