"""The chat turn, in order:

1 authorize (the servicer authenticated the caller) · 2 idempotency · 3 rate limit and budget ·
4 session, and the user's message persisted before any model call · 5 context (summary,
window, recall) · 6 answer cache · 7 agent loop (tools, approvals) · 8 persist the answer,
usage rows, charges, cache, rolling summary, metrics, one log line.

`ChatCore.run_turn` is an async generator of `TurnEvent`s; the unary Chat RPC keeps the
final one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from parley.memory.v1 import memory_pb2 as mpb
from parley.runtime import validation as v
from parley.runtime.config import ChatSettings
from parley.runtime.errors import NotFound, ParleyError
from parley.runtime.interceptors import current_request_id
from parley.runtime.logging import get_logger
from services.chat import codec
from services.chat.agent import Agent, AgentState, ModelCall
from services.chat.approvals import ApprovalStore
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
from services.chat.guards import ChatGuards, Principal, estimate_turn_tokens
from services.chat.guards.usage import usage_row
from services.chat.peers import ROLE_NAMES, MemoryPeer, PromptMessage
from services.chat.summary import Summarizer
from services.chat.telemetry import TurnMetrics
from services.chat.window import RecallPlan, WindowCache, fit_window, plan_recall, slide

RECALL_SLACK = 8  # recall hits fetched beyond recall_top_k when the window is not known yet, to drop its own
MAX_RECALL_TOP_K = 100  # RecallRequest.top_k's bound (memory.proto)
_log = get_logger(__name__)


@dataclass
class AssembledContext:
    messages: list[PromptMessage]
    memory: list[MemoryItem]
    warnings: list[str]
    fingerprint: str  # of everything but recall: summary, system prompt, the window before this message
    window: int  # messages of the session inside the window
    history: list[PromptMessage] = field(default_factory=list)  # that window, every role (empty: unknown)


class ChatCore:
    def __init__(self, settings: ChatSettings, default_max_tokens: int, memory: MemoryPeer, agent: Agent,
                 approvals: ApprovalStore, guards: ChatGuards, summarizer: Summarizer, metrics: TurnMetrics) -> None:
        self.settings = settings
        self.default_max_tokens = default_max_tokens
        self.memory = memory
        self.agent = agent
        self.approvals = approvals
        self.guards = guards
        self.summarizer = summarizer
        self.metrics = metrics
        self.windows = WindowCache(settings.window_cache_sessions)

    # -- validation and access -------------------------------------------------------------------

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

    async def authenticate(self, metadata) -> Principal:
        return await self.guards.auth.authenticate(metadata)

    def authorize(self, principal: Principal, user_id: str, session_id: str | None = None) -> None:
        """The caller may act for `user_id` (its own, or any with an admin key); ids are well-formed."""
        v.user_id(user_id)
        if session_id is not None:
            v.uuid_id(session_id, "session_id")
        self.guards.auth.authorize(principal, user_id)

    # -- a turn --------------------------------------------------------------------------------

    async def run_turn(self, principal: Principal, req: TurnRequest) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        self.validate(req)
        self.authorize(principal, req.user_id)
        with self.metrics.step("check_model"):
            await self.agent.catalog.check_model(req.options.model)
        g = self.guards
        fingerprint = f"{req.session_id}\0{req.message}"
        if req.request_id:
            stored = await g.idempotency.begin(req.user_id, req.request_id, fingerprint)
            if stored is not None:  # a retry: the first result, not a second run
                replay = codec.decode(stored)
                yield SessionStarted(replay.session_id)
                yield TurnFinished(replay)
                return
        try:
            async for event in self._turn(req, started):
                if isinstance(event, TurnFinished) and req.request_id:
                    await g.idempotency.complete(req.user_id, req.request_id, codec.encode(event.result), fingerprint)
                yield event
        except BaseException:
            if req.request_id:
                await g.idempotency.abandon(req.user_id, req.request_id)
            raise

    async def _turn(self, req: TurnRequest, started: float) -> AsyncIterator[TurnEvent]:
        g, step = self.guards, self.metrics.step
        with step("limits"):
            await g.limits.acquire(req.user_id, estimate_turn_tokens(
                req.message, self.settings, req.options.max_tokens, self.default_max_tokens))
            await g.budget.check(req.user_id)
        # The message's id is chosen here: recall, which starts now (with document search: they need only the
        # message), can leave it out before it is stored.
        message = PromptMessage("user", req.message, message_id=str(uuid.uuid4()))
        lookups = self.start_lookups(req, message, self.windows.peek(req.session_id) if req.session_id else [])
        history = None
        try:
            if req.session_id:
                session_id = req.session_id
                if session_id not in self.windows:  # read while the message is stored (`fit_window` joins them)
                    history = asyncio.ensure_future(self._read_window(req.user_id, session_id))
                    self.metrics.windows.labels("miss").inc()
            else:
                with step("session"):
                    session_id = (await self.memory.create_session(req.user_id, title=req.message[:80])).conversation_id
            with step("persist_message"):  # NOT_FOUND (nothing stored) unless the session is the user's
                stored, session = await self.memory.append(req.user_id, session_id, [message])
            yield SessionStarted(session_id)
            with step("context"):
                if history is not None:
                    earlier = await history
                elif not req.session_id:
                    earlier = []  # a new session
                else:  # the cached window, unless something else was stored in the session since
                    earlier = self.windows.earlier(session_id, session.message_count)
                    self.metrics.windows.labels("miss" if earlier is None else "hit").inc()
                    if earlier is None:
                        earlier = await self._read_window(req.user_id, session_id)
                ctx = await self.assemble(req, session, PromptMessage.from_memory(stored[0]), earlier, lookups)
        except BaseException:
            lookups.cancel()
            if history is not None:
                _discard(history)
            raise
        model = req.options.model or await self.agent.catalog.default_model()
        use_cache = g.cache.enabled and not req.options.skip_cache
        if use_cache:
            with step("cache"):
                hit = await g.cache.get(req.user_id, model, req.message, ctx.fingerprint)
            self.metrics.cache.labels("hit" if hit else "miss").inc()
            if hit is not None:
                cached = codec.decode(hit)
                yield TextDelta(cached.response)
                state = AgentState(messages=[], question=req.message, text=cached.response,
                                   served_model=cached.model, provider=cached.provider)
                yield TurnFinished(await self._finish(req, session, state, ctx, started, cache_hit=True))
                return

        state = AgentState(
            messages=ctx.messages, question=req.message, model=req.options.model,
            max_tokens=req.options.max_tokens, temperature=req.options.temperature,
            use_tools=not req.options.disable_tools, stream=req.stream,
        )
        agent_started = time.perf_counter()
        async for event in self.agent.run(state, req.user_id, ctx.warnings):
            yield event
        self.metrics.steps.labels("agent").observe(time.perf_counter() - agent_started)
        with step("finish"):
            result = await self._finish(req, session, state, ctx, started, cache_hit=False)
            if use_cache and not result.tool_calls and not result.pending_approvals and result.response:
                await g.cache.put(req.user_id, model, req.message, ctx.fingerprint, codec.encode(result))
        yield TurnFinished(result)

    async def resolve_approval(self, principal: Principal, user_id: str, approval_id: str,
                               approve: bool, stream: bool = True) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        self.authorize(principal, user_id)
        aid = v.uuid_id(approval_id, "approval_id")
        paused = await self.approvals.take(user_id, aid)
        if paused is None:
            raise NotFound(message=f"approval {approval_id} not found (unknown, expired or already resolved)")
        state = AgentState.from_json(paused.state_json)
        state.stream = stream
        warnings: list[str] = []
        yield SessionStarted(paused.session_id)
        async for event in self.agent.resume(state, user_id, approve, warnings):
            yield event
        session = await self.memory.get_session(user_id, paused.session_id)
        ctx = AssembledContext([], [], warnings, "", session.message_count)
        req = TurnRequest(user_id=user_id, message=state.question, session_id=paused.session_id)
        yield TurnFinished(await self._finish(req, session, state, ctx, started, cache_hit=False))

    async def _finish(self, req: TurnRequest, session: mpb.Conversation, state: AgentState,
                      ctx: AssembledContext, started: float, cache_hit: bool) -> TurnResult:
        """Persist what the turn produced (one atomic append), account for it, build the result."""
        g = self.guards
        user_id, session_id = req.user_id, session.conversation_id
        answer = state.text.strip()
        to_store, calls, usage, records = list(state.transcript), list(state.calls), state.usage, list(state.records)
        if state.pending:
            # What this part stores, reports and accounts for is done here: the resumed turn must not store,
            # list, record or charge it again, only what it adds.
            state.transcript, state.calls, state.usage, state.records = [], [], Usage(), []
            await self.approvals.save(state.pending[0].approval_id, user_id, session_id, state.to_json())
        else:
            to_store.append(PromptMessage("assistant", answer or "(no answer)"))
        tools_called = ",".join(r.name for r in records) or None
        request_id = req.request_id or current_request_id() or ""  # one id per turn in the usage rows

        async def store() -> list[mpb.Message]:
            if not to_store:
                return []
            self.windows.drop(session_id)  # until the window after this append is known
            messages, after = await self.memory.append(user_id, session_id, to_store)
            if ctx.history and after.message_count == session.message_count + len(messages):  # none but ours
                self.windows.put(session_id, after.message_count, slide(
                    ctx.history, [PromptMessage.from_memory(m) for m in messages], self.settings.history_token_budget))
            return messages

        def rows(summary_call: ModelCall | None) -> list[dict]:
            return [usage_row(
                user_id=user_id, model=call.model, provider=call.provider, prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens, cost_usd=call.cost_usd if call.priced else None,
                priced=call.priced, estimated=call.estimated, latency_ms=call.latency_ms, cache_hit=False,
                tool_called=tools_called, kind=kind, session_id=session_id, request_id=request_id)
                for call, kind in [(c, "generate") for c in calls] + ([(summary_call, "summary")] if summary_call
                                                                      else [])]

        async def account(summary_call: ModelCall | None) -> None:
            """Usage rows, then the charges (the budget's rebuild from the rows relies on this order)."""
            await g.usage.record_many(rows(summary_call))
            await asyncio.gather(g.limits.charge(user_id, usage.total_tokens),
                                 g.budget.charge(user_id, usage.cost_usd if usage.priced else None))

        if cache_hit:
            stored = await store()
            await g.usage.record(user_id=user_id, model=state.served_model, provider=state.provider, kind="cache",
                                 cache_hit=True, cost_usd=0.0, priced=True, session_id=session_id,
                                 request_id=request_id)
            usage = Usage()
        elif not state.pending and self.summarizer.due(session, ctx.window + len(to_store), len(to_store)):
            stored = await store()  # the summary (rare) folds in what is stored, and is charged with the turn
            summary_call = await self._summarize(user_id, session_id, ctx.window + len(stored), state.model)
            if summary_call:
                usage.add(summary_call.prompt_tokens, summary_call.completion_tokens, summary_call.cost_usd,
                          summary_call.priced, summary_call.estimated)
            await account(summary_call)
        else:
            # Storing the answer and accounting for the turn are independent: they run together. Both are
            # attempted even when one fails (the model calls happened and cost what they cost).
            stored, accounted = await asyncio.gather(store(), account(None), return_exceptions=True)
            for outcome in (stored, accounted):
                if isinstance(outcome, BaseException):
                    raise outcome
        result = TurnResult(
            response=answer, model=state.served_model, session_id=session_id, context_size=state.context_size,
            memory=ctx.memory, tool_calls=records, usage=usage, provider=state.provider, cache_hit=cache_hit,
            pending_approvals=state.pending, message_id=stored[-1].message_id if stored and not state.pending else "",
            warnings=ctx.warnings, latency_ms=(time.perf_counter() - started) * 1000,
        )
        self.metrics.turn(result)
        _log.info(
            "turn", user_id=user_id, session_id=session_id, prompt=self._loggable(req.message),
            tokens_used=usage.total_tokens, time_ms=round(result.latency_ms, 1), tool_called=tools_called,
            model=result.model, cost=usage.cost_usd if usage.priced else None, cache_hit=cache_hit,
        )
        return result

    def _loggable(self, prompt: str) -> str | None:
        if self.settings.log_prompts == "none":
            return None
        if self.settings.log_prompts == "hash":
            return "sha256:" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
        return prompt[: self.settings.log_prompt_max_chars]

    async def _summarize(self, user_id: str, session_id: str, window: int, model: str) -> ModelCall | None:
        """Fold old turns into the summary (`_finish` found it due, without a call); the session is read again,
        fresh, for it."""
        try:
            fresh = await self.memory.get_session(user_id, session_id)
            return await self.summarizer.maybe_summarize(user_id, fresh, window, model)
        except ParleyError as exc:  # a missed summary is retried on the next turn
            _log.warning("summary_failed", error=exc.message)
            return None

    def start_lookups(self, req: TurnRequest, message: PromptMessage, cached: list[PromptMessage] | None) -> Lookups:
        """Start recall and document search for this message (they run while the message is persisted and, unless
        cached, the window read).

        Recall must not return what will be in the window, which is only known once the window is
        (`window.plan_recall`): with the window `cached` (before `message`; [] for a new session, None: not
        cached), it leaves out what is sure to stay in it and asks for one more hit per message that may slide
        out; otherwise for RECALL_SLACK more. `assemble` drops the window's and, only if that leaves too few,
        asks again excluding them.
        """
        use_recall = bool(self.settings.recall_top_k) and not req.options.disable_recall
        use_documents = bool(self.settings.document_top_k) and not req.options.disable_recall
        warnings: list[str] = []
        plan = plan_recall(cached, message, self.settings.history_token_budget, self.settings.recall_top_k,
                           RECALL_SLACK, MAX_RECALL_TOP_K) if use_recall else None
        return Lookups(
            asyncio.ensure_future(self._recall(req, plan.exclude, plan.top_k, warnings) if plan else _nothing()),
            asyncio.ensure_future(self._documents(req, warnings) if use_documents else _nothing()),
            warnings, plan)

    async def _read_window(self, user_id: str, session_id: str) -> list[PromptMessage]:
        return await self.memory.history(user_id, session_id, self.settings.history_token_budget)

    async def assemble(self, req: TurnRequest, session: mpb.Conversation, message: PromptMessage,
                       earlier: list[PromptMessage], lookups: Lookups) -> AssembledContext:
        """System prompt + summary + recalled memories + the recent window, which ends with `message` (stored).
        `earlier`: the session's newest messages within the history budget, with or without `message`."""
        history = fit_window(earlier, message, self.settings.history_token_budget)
        summary = session.summary
        warnings = lookups.warnings
        in_window = {m.message_id for m in history if m.message_id}
        hits = await lookups.recall
        kept = [h for h in hits if h.message.message_id not in in_window][: self.settings.recall_top_k]
        plan = lookups.plan
        # Asked again, leaving out the window, if the first call left out a message that is not in it after all
        # (the cached window did not hold: another writer stored in the session), or kept too few of its hits.
        if plan and (not in_window.issuperset(plan.exclude)
                     or (len(hits) == plan.top_k and len(kept) < self.settings.recall_top_k)):
            kept = await self._recall(req, sorted(in_window), self.settings.recall_top_k, warnings)
        memory = [
            MemoryItem(
                source="message", content=h.message.content, score=h.score,
                origin_id=h.message.conversation_id, role=ROLE_NAMES.get(h.message.role, "user"),
                created_at=h.message.create_time.ToDatetime() if h.message.HasField("create_time") else None,
            )
            for h in kept
        ]
        documents = await lookups.documents
        system = self.settings.system_prompt
        if summary:
            system += f"\n\nSummary of the earlier conversation:\n{summary}"
        if memory:
            lines = "\n".join(f"- ({m.role}) {m.content}" for m in memory)
            system += f"\n\nFrom earlier conversations with this user:\n{lines}"
        if documents:
            passages = "\n".join(f"- {d.content}" for d in documents)
            system += f"\n\nRelevant passages from the knowledge base:\n{passages}"
        window = [m for m in history if m.role in ("user", "assistant") and m.content]
        fingerprint = hashlib.sha256(json.dumps(
            [self.settings.system_prompt, summary, [(m.role, m.content) for m in window[:-1]],
             [d.content for d in documents]]).encode()).hexdigest()
        return AssembledContext([PromptMessage("system", system), *window], memory + documents, warnings,
                                fingerprint, len(history), history)

    async def _recall(self, req: TurnRequest, exclude: list[str], top_k: int,
                      warnings: list[str]) -> list[mpb.RecalledMessage]:
        try:
            return await self.memory.recall(req.user_id, req.message, top_k, self.settings.recall_min_score, exclude)
        except ParleyError as exc:  # answer without recall, and say so
            _log.warning("recall_failed", error=exc.message)
            if not any(w.startswith("recall unavailable") for w in warnings):
                warnings.append("recall unavailable: answered without memories of past sessions")
            return []

    async def _documents(self, req: TurnRequest, warnings: list[str]) -> list[MemoryItem]:
        try:
            chunks = await self.memory.search_documents(req.user_id, req.message, self.settings.document_top_k)
        except ParleyError as exc:
            _log.warning("document_search_failed", error=exc.message)
            warnings.append("document search unavailable: answered without the knowledge base")
            return []
        return [MemoryItem(source="document", content=c.content, score=c.score, origin_id=c.document_id, role="",
                           created_at=None)
                for c in chunks if c.score >= self.settings.document_min_score]


@dataclass
class Lookups:
    """Recall and document search of one turn, started before the window is read."""

    recall: asyncio.Future
    documents: asyncio.Future
    warnings: list[str]
    plan: RecallPlan | None  # None: recall is off

    def cancel(self) -> None:
        _discard(self.recall)
        _discard(self.documents)


def _discard(future: asyncio.Future) -> None:
    """Cancel a lookup the turn no longer needs; if it already failed, its error is dropped (the turn fails for a
    reason of its own), not logged later as never retrieved."""
    future.cancel()
    if future.done() and not future.cancelled():
        future.exception()


async def _nothing() -> list:
    return []
