"""The chat turn: persist, assemble context, let the model answer, persist, account.

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
from parley.runtime.errors import ParleyError, Unavailable
from parley.runtime.logging import get_logger
from services.chat.events import (
    MemoryItem,
    SessionStarted,
    TextDelta,
    TurnEvent,
    TurnFinished,
    TurnRequest,
    TurnResult,
    Usage,
)
from services.chat.peers import InferencePeer, MemoryPeer, PromptMessage

_log = get_logger(__name__)


@dataclass
class AssembledContext:
    messages: list[PromptMessage]
    memory: list[MemoryItem]
    warnings: list[str]


class ChatCore:
    def __init__(self, settings: ChatSettings, memory: MemoryPeer, inference: InferencePeer) -> None:
        self.settings = settings
        self.memory = memory
        self.inference = inference

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

        usage = Usage()
        text_parts: list[str] = []
        model = provider = ""
        prompt_tokens = 0
        request = self.inference.request(
            req.options.model, ctx.messages, [], req.options.max_tokens, req.options.temperature
        )
        async for event in self.inference.stream(request):
            kind = event.WhichOneof("event")
            if kind == "delta":
                text_parts.append(event.delta.text)
                yield TextDelta(event.delta.text)
            elif kind == "final":
                r = event.final.response
                model, provider = r.model, r.provider
                prompt_tokens = r.usage.prompt_tokens
                usage.add(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cost.cost_usd,
                          r.usage.cost.priced, r.usage.estimated)
        if usage.model_calls == 0:
            raise Unavailable(message="the inference service ended the stream without a final event")

        answer = "".join(text_parts).strip()
        stored = await self.memory.append(req.user_id, session_id, [PromptMessage("assistant", answer)])
        result = TurnResult(
            response=answer, model=model, session_id=session_id, context_size=prompt_tokens, memory=ctx.memory,
            usage=usage, provider=provider, message_id=stored[-1].message_id if stored else "",
            warnings=ctx.warnings, latency_ms=(time.perf_counter() - started) * 1000,
        )
        _log.info(
            "turn", user_id=req.user_id, session_id=session_id, prompt=req.message[:200],
            tokens_used=usage.total_tokens, time_ms=round(result.latency_ms, 1), tool_called=None,
            model=model, cost=usage.cost_usd if usage.priced else None, cache_hit=False,
        )
        yield TurnFinished(result)

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
        return AssembledContext([PromptMessage("system", system), *history], memory, warnings)


def _role_name(role: int) -> str:
    return {1: "system", 2: "user", 3: "assistant", 4: "tool"}.get(role, "user")
