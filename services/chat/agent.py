"""The agent loop: the model answers, or calls tools whose results go back to it.

Models with native function calling get the tool list and decide themselves (up to
`max_steps` rounds; independent calls of one round run in parallel). Models without it
(the embedded SmolLM2) are routed: `ToolRouter` picks the tool a question is about by
embedding similarity, the model fills that tool's arguments under a JSON-schema grammar
(forced tool choice), the tool runs, and the model answers from its result.

Side-effecting tools are not run: the loop stops with a pending approval, and
`resume` continues it once the user approved or denied.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from parley.inference.v1 import inference_pb2 as ipb
from parley.runtime.config import ChatSettings
from parley.runtime.errors import FailedPrecondition, NotFound, ParleyError, Unavailable
from parley.runtime.logging import get_logger
from parley.runtime.protoconv import from_struct
from parley.tools.v1 import tools_pb2 as tpb
from services.chat.events import PendingApproval, TextDelta, ToolCalled, ToolCallRecord, ToolFinished, Usage
from services.chat.peers import InferencePeer, PromptMessage, ToolsPeer
from services.chat.router import ToolRouter
from services.chat.slots import narrow_schema

_log = get_logger(__name__)
MAX_RESULT_CHARS_FOR_SMALL_MODELS = 1500
TOOL_DEADLINE_MARGIN_S = 5.0


@dataclass
class ModelCall:
    """One model call's accounting, for the usage rows."""

    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    priced: bool
    estimated: bool
    latency_ms: float


@dataclass
class AgentState:
    """Everything a turn accumulates; serialisable so a paused turn can resume."""

    messages: list[PromptMessage]  # the prompt so far
    question: str
    model: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    use_tools: bool = True
    step: int = 0
    text: str = ""
    provider: str = ""
    served_model: str = ""
    context_size: int = 0
    transcript: list[PromptMessage] = field(default_factory=list)  # to persist: tool calls, tool results
    records: list[ToolCallRecord] = field(default_factory=list)
    calls: list[ModelCall] = field(default_factory=list)
    pending: list[PendingApproval] = field(default_factory=list)
    pending_calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, args) awaiting approval
    usage: Usage = field(default_factory=Usage)
    # Whether the caller reads the answer as it is written (StreamChat). A unary caller gets the whole answer
    # at the end, so each model call is then one unary Generate: no stream of deltas to relay (not saved).
    stream: bool = True

    def to_json(self) -> str:
        return json.dumps({
            "messages": [m.__dict__ for m in self.messages], "question": self.question, "model": self.model,
            "max_tokens": self.max_tokens, "temperature": self.temperature, "use_tools": self.use_tools,
            "step": self.step, "context_size": self.context_size,
            "transcript": [m.__dict__ for m in self.transcript], "records": [r.__dict__ for r in self.records],
            "pending_calls": self.pending_calls, "pending": [p.__dict__ for p in self.pending],
            "usage": self.usage.__dict__, "calls": [c.__dict__ for c in self.calls],
        })

    @classmethod
    def from_json(cls, raw: str) -> AgentState:
        d = json.loads(raw)
        state = cls(messages=[PromptMessage(**m) for m in d["messages"]], question=d["question"], model=d["model"],
                    max_tokens=d["max_tokens"], temperature=d["temperature"], use_tools=d["use_tools"],
                    step=d["step"], context_size=d["context_size"])
        state.transcript = [PromptMessage(**m) for m in d["transcript"]]
        state.records = [ToolCallRecord(**r) for r in d["records"]]
        state.pending_calls = [tuple(c) for c in d["pending_calls"]]
        state.pending = [PendingApproval(**p) for p in d.get("pending", [])]
        state.usage = Usage(**d["usage"])
        state.calls = [ModelCall(**c) for c in d["calls"]]
        return state


class ModelCatalog:
    """What the inference service says about its models (cached): default name, native tool calling."""

    def __init__(self, inference: InferencePeer, ttl_s: float = 60.0) -> None:
        self._inference, self._ttl = inference, ttl_s
        self._models: dict[str, ipb.Model] = {}
        self._default = ""
        self._fetched = 0.0

    async def _refresh(self) -> None:
        if time.monotonic() - self._fetched < self._ttl and self._models:
            return
        r = await self._inference.client.call("ListModels", ipb.ListModelsRequest(page_size=1000))
        self._models = {m.name: m for m in r.models}
        self._default = next((m.name for m in r.models if m.is_default), r.models[0].name if r.models else "")
        self._fetched = time.monotonic()

    async def default_model(self) -> str:
        await self._refresh()
        return self._default

    async def check_model(self, model: str) -> None:
        """NOT_FOUND naming the configured models when `model` is not one of them (before anything is stored)."""
        if not model:
            return
        await self._refresh()
        if model not in self._models:
            self._fetched = 0.0  # maybe configured since: look again next time
            raise NotFound(message=f"model {model!r} is not configured; available: {', '.join(sorted(self._models))}",
                           metadata={"model": model})

    async def native_tools(self, model: str) -> bool:
        await self._refresh()
        info = self._models.get(model or self._default)
        return bool(info and info.native_tool_calling)


class Agent:
    def __init__(self, settings: ChatSettings, inference: InferencePeer, tools: ToolsPeer | None,
                 router: ToolRouter | None, catalog: ModelCatalog) -> None:
        self.settings = settings
        self.inference = inference
        self.tools = tools
        self.router = router
        self.catalog = catalog
        self._tool_cache: tuple[float, list[tpb.Tool]] = (0.0, [])
        self._timeouts_ms: dict[str, int] = {}

    async def available_tools(self) -> list[tpb.Tool]:
        if self.tools is None:
            return []
        fetched, cached = self._tool_cache
        if time.monotonic() - fetched < self.settings.tools_cache_s and cached:
            return cached
        tools = await self.tools.list_tools()
        self._tool_cache = (time.monotonic(), tools)
        self._timeouts_ms = {t.name: t.timeout_ms for t in tools}
        return tools

    async def run(self, state: AgentState, user_id: str, warnings: list[str]) -> AsyncIterator[object]:
        """Drive the loop; yields TextDelta / ToolCalled / ToolFinished events, fills `state`."""
        tools: list[tpb.Tool] = []
        if state.use_tools:
            try:
                tools = await self.available_tools()
            except ParleyError as exc:
                _log.warning("tools_unavailable", error=exc.message)
                warnings.append("tools unavailable: answered without tools")
        native = await self.catalog.native_tools(state.model)
        by_name = {t.name: t for t in tools}
        while True:
            state.step += 1
            last_step = state.step >= self.settings.max_agent_steps
            if native:
                request = self.inference.request(
                    state.model, state.messages, tools if not last_step else [], state.max_tokens, state.temperature,
                    tool_choice=ipb.TOOL_CHOICE_AUTO if tools and not last_step else ipb.TOOL_CHOICE_UNSPECIFIED)
            else:
                route = None
                if tools and state.step == 1 and self.router is not None:
                    route = await self.router.route(state.question, tools)
                if route is not None:
                    _log.info("tool_routed", tool=route.tool.name, score=round(route.score, 3))
                    tool = tpb.Tool()
                    tool.CopyFrom(route.tool)
                    tool.parameters_schema.Clear()
                    tool.parameters_schema.update(narrow_schema(from_struct(route.tool.parameters_schema),
                                                                state.question))
                    request = self.inference.request(
                        state.model, state.messages, [tool], state.max_tokens or 256, state.temperature,
                        tool_choice=ipb.TOOL_CHOICE_REQUIRED, forced_tool=route.tool.name)
                else:
                    request = self.inference.request(
                        state.model, state.messages, [], state.max_tokens, state.temperature)
            calls: list[ipb.ToolCall] = []
            try:
                async for event in self._generate(request, state):
                    if isinstance(event, ipb.ToolCall):
                        calls.append(event)
                    else:
                        yield event
            except FailedPrecondition as exc:
                if request.tool_choice != ipb.TOOL_CHOICE_REQUIRED:
                    raise
                # The small model could not produce the routed call: answer without the tool, and say so.
                _log.warning("routed_tool_call_failed", tool=request.forced_tool, error=exc.message)
                warnings.append(f"could not call {request.forced_tool}: {exc.message}; answered without it")
                async for event in self._generate(self.inference.request(
                        state.model, state.messages, [], state.max_tokens, state.temperature), state):
                    yield event
                return
            if not calls:
                return
            if native and last_step:
                # The last step offers no tools, so the model must answer; a model that calls one anyway is
                # not obeyed (the loop would otherwise run past max_agent_steps for as long as it insists).
                names = ", ".join(sorted({c.name for c in calls}))
                _log.warning("agent_max_steps", steps=state.step, tools=names)
                warnings.append(f"stopped at max_agent_steps={self.settings.max_agent_steps}: the model still "
                                f"called {names}; those calls did not run")
                return
            state.text = ""  # words said before calling tools are not the answer
            state.transcript.append(PromptMessage("assistant", "", [(c.id, c.name, c.arguments_json) for c in calls]))
            risky = [c for c in calls if by_name.get(c.name) is not None and by_name[c.name].side_effects]
            if risky:
                state.pending_calls = [(c.id, c.name, c.arguments_json) for c in calls]
                approval_id = str(uuid.uuid4())  # one decision covers every risky call of this round
                state.pending = [PendingApproval(approval_id, c.name, c.arguments_json) for c in risky]
                return
            async for event in self._execute(user_id, [(c.id, c.name, c.arguments_json) for c in calls], state,
                                             native):
                yield event

    async def resume(self, state: AgentState, user_id: str, approved: bool, warnings: list[str]):
        """Continue a paused turn: run (or refuse) the pending calls, then let the model answer."""
        calls, risky, state.pending_calls, state.pending = state.pending_calls, state.pending, [], []
        native = await self.catalog.native_tools(state.model)
        # A denial refuses the side-effecting calls it was asked about; harmless calls of the same step still run
        # (a state saved without that list refuses every call of the step).
        denied = set() if approved else {p.tool_name for p in risky} or {name for _, name, _ in calls}
        async for event in self._execute(user_id, calls, state, native, denied=denied):
            yield event
        async for event in self.run(state, user_id, warnings):
            yield event

    async def _generate(self, request: ipb.StreamGenerateRequest, state: AgentState):
        started = time.perf_counter()
        final = None
        if not state.stream:
            final = await self.inference.generate(request)
            if final.message.content:
                state.text += final.message.content
                yield TextDelta(final.message.content)
            for call in final.message.tool_calls:
                yield call
        else:
            async for event in self.inference.stream(request):
                kind = event.WhichOneof("event")
                if kind == "delta":
                    state.text += event.delta.text
                    yield TextDelta(event.delta.text)
                elif kind == "tool_call":
                    yield event.tool_call
                elif kind == "final":
                    final = event.final.response
        if final is None:
            raise Unavailable(message="the inference service ended the stream without a final event")
        u = final.usage
        state.usage.add(u.prompt_tokens, u.completion_tokens, u.cost.cost_usd, u.cost.priced, u.estimated)
        state.calls.append(ModelCall(final.model, final.provider, u.prompt_tokens, u.completion_tokens,
                                     u.cost.cost_usd, u.cost.priced, u.estimated,
                                     (time.perf_counter() - started) * 1000))
        state.served_model, state.provider = final.model, final.provider
        if not state.context_size:
            state.context_size = u.prompt_tokens

    async def _execute(self, user_id: str, calls: list[tuple[str, str, str]], state: AgentState, native: bool,
                       denied: set[str] = frozenset()):
        for call_id, name, args in calls:
            yield ToolCalled(call_id, name, args)
        records = await asyncio.gather(*(self._run_tool(user_id, c, denied) for c in calls))
        for record in records:
            state.records.append(record)
            yield ToolFinished(record)
            content = record.result_json if not record.error else json.dumps({"error": record.error})
            state.transcript.append(PromptMessage("tool", content, tool_call_id=record.call_id, name=record.name))
            if native:
                state.messages.append(PromptMessage("tool", content, tool_call_id=record.call_id, name=record.name))
        if native:
            # Arguments that are not a JSON object (the tool result says so) go back as {}: the inference
            # service rejects a prompt whose tool calls do not parse, which would fail the whole turn.
            state.messages.insert(len(state.messages) - len(records),
                                  PromptMessage("assistant", "", [(i, n, _object_or_empty(a)) for i, n, a in calls]))
        else:
            # Small models read a plain instruction far better than tool-role messages.
            results = "\n".join(
                f"- {r.name}({r.arguments_json}) returned: "
                f"{(r.result_json if not r.error else 'ERROR: ' + r.error)[:MAX_RESULT_CHARS_FOR_SMALL_MODELS]}"
                for r in records)
            state.messages.append(PromptMessage(
                "system", f"Tool results for the user's last question:\n{results}\n"
                          "Answer the question using these results. Quote the numbers exactly."))

    async def _run_tool(self, user_id: str, call: tuple[str, str, str], denied: set[str]) -> ToolCallRecord:
        call_id, name, args = call
        record = ToolCallRecord(call_id=call_id, name=name, arguments_json=args)
        if name in denied:
            record.error = "the user denied this tool call"
            return record
        try:
            arguments = json.loads(args or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            record.error = f"arguments are not valid JSON: {exc}"
            return record
        started = time.perf_counter()
        try:
            limit_s = self._timeouts_ms.get(name, 0) / 1000
            deadline = max(self.tools.client.timeout_s, limit_s + TOOL_DEADLINE_MARGIN_S)
            result = await self.tools.execute(user_id, name, arguments, call_id, timeout_s=deadline)
        except ParleyError as exc:  # schema violations, unknown tool, tools service down: the model reads it
            record.error = exc.message
        else:
            record.result_json = result.content_json
            record.error = result.error
        record.duration_ms = (time.perf_counter() - started) * 1000
        return record


def _object_or_empty(arguments_json: str) -> str:
    """`arguments_json` if it encodes a JSON object, else "{}"."""
    try:
        return arguments_json if isinstance(json.loads(arguments_json or "{}"), dict) else "{}"
    except ValueError:
        return "{}"
