"""The native-tool-calling agent loop and the rolling summary, over the real services with a scripted model.

The stack is the real one (PostgreSQL, Redis, memory, tools, inference, chat on port 0); only the model
is scripted: a route `{"provider": "plugin", "plugin": "scripted"}` whose adapter
(`tests/chat/scripted.py`) plays the completions each test lists and records the requests it got.
Models on such a route have native function calling, so the model itself picks the tools (no router).
The tools run for real in the tools service (built-ins, and two test tools from a `parley.tools` plugin).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from dataclasses import dataclass

import grpc
import pytest
from sqlalchemy import text

from parley.chat.v1 import chat_pb2 as pb
from parley.chat.v1 import chat_pb2_grpc
from parley.memory.v1 import memory_pb2 as mpb
from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.clients import make_channel
from parley.runtime.config import InferenceSettings
from parley.runtime.db import Database
from parley.runtime.metrics import Metrics
from services.chat.peers import ROLE_NAMES, MemoryPeer
from services.chat.summary import PROMPT as SUMMARY_PROMPT
from services.inference.app import build_core
from services.inference.domain import Role, ToolChoice
from services.inference.routes import RouteError, load_routes
from services.inference.telemetry import InferenceMetrics
from tests.chat.conftest import ALL
from tests.chat.scripted import NOTES, PROVIDERS, ScriptedProvider, call, fail, install_plugins, say
from tests.conftest import eventually

MODEL = "scripted-model"
MAX_STEPS = 3
HISTORY_BUDGET = 64  # tokens: a few short messages, so a conversation soon outgrows it
SUMMARY_BATCH = 4
ROUTE = {"name": MODEL, "provider": "plugin", "plugin": "scripted", "context_window": 32000,
         "pricing": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}}


@dataclass
class Stack:
    chat: chat_pb2_grpc.ChatServiceStub
    memory: memory_pb2_grpc.MemoryServiceStub
    model: ScriptedProvider
    database_url: str
    metrics: Metrics


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    root = install_plugins(tmp_path_factory.mktemp("chat-scripted"))
    sys.path.insert(0, str(root))
    yield
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
async def stack(start_stack, plugins, database_url):
    # No cooldown and short retry delays: a test that makes the model fail leaves nothing behind for the next one.
    inference = {"local_enabled": False, "default_model": MODEL, "routes": [ROUTE], "cooldown_s": 0,
                 "retry_initial_backoff_s": 0.01}
    chat = {"max_agent_steps": MAX_STEPS, "history_token_budget": HISTORY_BUDGET, "summary_batch": SUMMARY_BATCH}
    async with start_stack(ALL, inference=inference, chat=chat) as app:
        channel = make_channel(app.address)
        yield Stack(chat_pb2_grpc.ChatServiceStub(channel), memory_pb2_grpc.MemoryServiceStub(channel),
                    PROVIDERS[MODEL], database_url, app.metrics)
        await channel.close()
    PROVIDERS.pop(MODEL, None)


def uid() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


async def stored(s: Stack, user: str, session_id: str) -> list[mpb.Message]:
    r = await s.memory.ListMessages(mpb.ListMessagesRequest(user_id=user, conversation_id=session_id, page_size=100))
    return list(r.messages)


async def usage_rows(s: Stack, user: str) -> list:
    db = Database(s.database_url)
    try:
        async with db.engine.connect() as conn:
            return (await conn.execute(text(
                "SELECT kind, model, provider, prompt_tokens, completion_tokens, cost_usd, priced, tool_called, "
                "request_id, session_id::text AS session_id FROM usage_records WHERE user_id = :u ORDER BY id"),
                {"u": user})).all()
    finally:
        await db.close()


def roles(messages) -> list[str]:
    """Role names of inference (domain) or memory (proto) messages."""
    return [m.role.value if isinstance(m.role, Role) else ROLE_NAMES[m.role] for m in messages]


async def test_one_tool_call_runs_and_its_result_goes_back_to_the_model(stack):
    user, question = uid(), "What is 15% of 1250, plus 3 squared?"
    stack.model.play(call(("calculator", {"expression": "1250 * 0.15 + 3^2"}), prompt_tokens=120, completion_tokens=12),
                     say("It comes to 196.5.", prompt_tokens=180, completion_tokens=8))
    events = [e async for e in stack.chat.StreamChat(pb.StreamChatRequest(user_id=user, message=question))]

    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:3] == ["session", "tool_call", "tool_result"], kinds
    assert set(kinds[3:-1]) == {"delta"} and kinds[-1] == "final" and kinds.count("final") == 1, kinds
    final = events[-1].final
    assert final.response == "It comes to 196.5."
    assert "".join(e.delta.text for e in events if e.delta.text) == final.response
    [record] = final.tool_calls
    assert record.name == "calculator" and not record.error, record
    assert json.loads(record.result_json) == {"expression": "1250 * 0.15 + 3^2", "result": 196.5}
    assert events[1].tool_call.call_id == record.call_id == events[2].tool_result.record.call_id
    assert (final.model, final.provider) == (MODEL, "plugin")
    u = final.usage
    assert (u.model_calls, u.prompt_tokens, u.completion_tokens) == (2, 300, 20)
    assert u.priced and u.cost_usd == pytest.approx((300 * 1.0 + 20 * 4.0) / 1e6)
    assert final.context_size == 120 and final.message_id

    # What the model saw: the tools and the question, then its own call and the tool's result.
    first, second = stack.model.requests
    assert "calculator" in {t.name for t in first.tools} and first.effective_tool_choice is ToolChoice.AUTO
    assert roles(first.messages) == ["system", "user"] and first.messages[-1].content == question
    assert roles(second.messages) == ["system", "user", "assistant", "tool"]
    asked, answered = second.messages[2], second.messages[3]
    assert [(c.id, c.name, json.loads(c.arguments_json)) for c in asked.tool_calls] == [
        (record.call_id, "calculator", {"expression": "1250 * 0.15 + 3^2"})]
    assert answered.tool_call_id == record.call_id and json.loads(answered.content)["result"] == 196.5

    # What memory keeps: the question, the call, the result, the answer.
    kept = await stored(stack, user, final.session_id)
    assert roles(kept) == ["user", "assistant", "tool", "assistant"]
    assert [(c.id, c.name) for c in kept[1].tool_calls] == [(record.call_id, "calculator")]
    assert json.loads(kept[1].tool_calls[0].arguments_json) == {"expression": "1250 * 0.15 + 3^2"}
    assert kept[2].tool_call_id == record.call_id and json.loads(kept[2].content)["result"] == 196.5
    assert kept[3].content == final.response and kept[3].message_id == final.message_id

    # One usage row per model call, of this turn.
    rows = await usage_rows(stack, user)
    assert [(r.kind, r.model, r.provider, r.prompt_tokens, r.completion_tokens, r.priced, r.tool_called)
            for r in rows] == [("generate", MODEL, "plugin", 120, 12, True, "calculator"),
                               ("generate", MODEL, "plugin", 180, 8, True, "calculator")]
    assert {r.session_id for r in rows} == {final.session_id}
    assert rows[0].request_id and rows[0].request_id == rows[1].request_id
    assert float(sum(r.cost_usd for r in rows)) == pytest.approx(u.cost_usd)


async def test_a_unary_turn_makes_unary_model_calls_and_a_streamed_turn_streams_them(stack):
    """Chat reads the answer whole, so its model calls are unary Generate calls (nothing to relay piece by piece);
    StreamChat's are StreamGenerate. Both give the same answer, tool results, usage and stored messages."""

    def inference_calls(method: str) -> float:
        return stack.metrics.registry.get_sample_value("parley_grpc_requests_total", {
            "service": "parley.inference.v1.InferenceService", "method": method, "code": "OK"}) or 0.0

    def script():
        stack.model.play(call(("calculator", {"expression": "6 * 7"}), prompt_tokens=90, completion_tokens=9),
                         say("Six times seven is 42.", prompt_tokens=140, completion_tokens=7))

    results = {}
    for mode in ("unary", "stream"):
        user, question = uid(), "What is six times seven?"
        script()
        before = {m: inference_calls(m) for m in ("Generate", "StreamGenerate")}
        if mode == "unary":
            final = await stack.chat.Chat(pb.ChatRequest(user_id=user, message=question))
        else:
            events = [e async for e in stack.chat.StreamChat(pb.StreamChatRequest(user_id=user, message=question))]
            assert [e.WhichOneof("event") for e in events].count("delta") >= 2, "the answer arrives in pieces"
            final = events[-1].final
        made = {m: inference_calls(m) - before[m] for m in before}
        assert made == ({"Generate": 2, "StreamGenerate": 0} if mode == "unary"
                        else {"Generate": 0, "StreamGenerate": 2}), (mode, made)
        assert stack.model.left == 0
        kept = await stored(stack, user, final.session_id)
        [record] = final.tool_calls
        results[mode] = (final.response, record.name, json.loads(record.result_json), final.usage.model_calls,
                         final.usage.prompt_tokens, final.usage.completion_tokens, final.context_size,
                         roles(kept), kept[-1].content)
    assert results["unary"] == results["stream"] == (
        "Six times seven is 42.", "calculator", {"expression": "6 * 7", "result": 42}, 2, 230, 16, 90,
        ["user", "assistant", "tool", "assistant"], "Six times seven is 42.")


async def test_independent_calls_of_one_step_run_concurrently_and_all_results_go_back(stack):
    user = uid()
    stack.model.play(call(("slow_echo", {"text": "left"}), ("slow_echo", {"text": "right"}),
                          ("current_time", {"timezone": "Europe/Lisbon"})),
                     say("Both echoes came back."))
    r = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="Echo left and right, and tell me the time."))
    assert r.response == "Both echoes came back." and r.usage.model_calls == 2
    assert [(t.name, t.error) for t in r.tool_calls] == [("slow_echo", ""), ("slow_echo", ""), ("current_time", "")]
    left, right, clock = (json.loads(t.result_json) for t in r.tool_calls)
    assert (left["text"], right["text"], clock["timezone"]) == ("left", "right", "Europe/Lisbon")
    # Each echo sleeps 0.4 s: run one after the other, their intervals could not overlap.
    assert left["started"] < right["ended"] and right["started"] < left["ended"], (left, right)

    second = stack.model.requests[1]
    assert roles(second.messages)[-4:] == ["assistant", "tool", "tool", "tool"]
    ids = [c.id for c in second.messages[-4].tool_calls]
    assert [m.tool_call_id for m in second.messages[-3:]] == ids == [t.call_id for t in r.tool_calls]
    assert [json.loads(m.content).get("text") for m in second.messages[-3:-1]] == ["left", "right"]


async def test_failing_tool_calls_send_the_error_back_to_the_model(stack):
    user = uid()
    stack.model.play(call(("calculator", {"expression": "1/0"}),  # the tool fails
                          ("calculator", {"formula": "1+1"}),  # arguments against the schema
                          ("no_such_tool", {}),  # not a tool
                          ("calculator", '{"expression": "1+')),  # arguments that are not JSON
                     say("Sorry, none of those worked."))
    r = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="Compute a few things."))
    assert r.response == "Sorry, none of those worked." and r.usage.model_calls == 2
    errors = [t.error for t in r.tool_calls]
    assert "division by zero" in errors[0]
    assert "do not match the schema of tool 'calculator'" in errors[1] and "formula" in errors[1], errors[1]
    assert "no_such_tool" in errors[2] and "not found" in errors[2]
    assert "not valid JSON" in errors[3]
    assert all(not t.result_json for t in r.tool_calls)

    second = stack.model.requests[1]
    results = second.messages[-4:]
    assert roles(results) == ["tool"] * 4
    assert [json.loads(m.content) for m in results] == [{"error": e} for e in errors]
    # Arguments that do not parse go back to the model as {} (the tool result says what was wrong) ...
    assert second.messages[-5].tool_calls[3].arguments_json == "{}"
    kept = await stored(stack, user, r.session_id)
    assert roles(kept) == ["user", "assistant", "tool", "tool", "tool", "tool", "assistant"]
    assert kept[1].tool_calls[3].arguments_json == '{"expression": "1+', "... and are stored as the model wrote them"


async def test_a_model_that_keeps_calling_tools_stops_at_max_steps(stack):
    user = uid()
    again = call(("calculator", {"expression": "2+2"}))
    stack.model.play(*[again] * (MAX_STEPS + 2))
    r = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="Keep adding."))

    assert len(stack.model.requests) == MAX_STEPS and r.usage.model_calls == MAX_STEPS
    assert [bool(q.tools) for q in stack.model.requests] == [True] * (MAX_STEPS - 1) + [False], \
        "the last step offers no tools"
    assert stack.model.requests[-1].effective_tool_choice is ToolChoice.NONE
    assert [t.name for t in r.tool_calls] == ["calculator"] * (MAX_STEPS - 1), "the last step's call did not run"
    assert any(f"max_agent_steps={MAX_STEPS}" in w for w in r.warnings), list(r.warnings)
    assert r.response == "" and r.message_id
    rows = await usage_rows(stack, user)
    assert [row.kind for row in rows] == ["generate"] * MAX_STEPS
    kept = await stored(stack, user, r.session_id)
    assert roles(kept) == ["user"] + ["assistant", "tool"] * (MAX_STEPS - 1) + ["assistant"]


async def test_a_side_effecting_tool_chosen_by_the_model_waits_for_approval(stack):
    user = uid()
    NOTES.clear()
    stack.model.play(call(("post_note", {"text": "ship it"}), ("current_time", {})))
    paused = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="Post 'ship it' on the board."))
    [pending] = paused.pending_approvals
    assert (pending.tool_name, json.loads(pending.arguments_json)) == ("post_note", {"text": "ship it"})
    assert NOTES == [] and list(paused.tool_calls) == [] and not paused.message_id, "nothing ran yet"
    assert stack.model.left == 0 and len(stack.model.requests) == 1
    assert paused.usage.model_calls == 1 and len(await usage_rows(stack, user)) == 1

    stack.model.play(say("Posted."))
    done = (await stack.chat.ResolveApproval(pb.ResolveApprovalRequest(
        user_id=user, approval_id=pending.approval_id, decision=pb.DECISION_APPROVE))).response
    assert NOTES == ["ship it"], "exactly the approved call ran, once"
    assert [(t.name, t.error) for t in done.tool_calls] == [("post_note", ""), ("current_time", "")]
    assert done.response == "Posted." and not done.pending_approvals and done.message_id
    assert done.usage.model_calls == 1, "the resumed part accounts for its own model call only"
    assert [r.kind for r in await usage_rows(stack, user)] == ["generate", "generate"], "one row per model call"
    [resumed] = stack.model.requests
    assert roles(resumed.messages)[-3:] == ["assistant", "tool", "tool"]
    assert json.loads(resumed.messages[-2].content) == {"posted": True, "text": "ship it"}
    kept = await stored(stack, user, paused.session_id)
    assert roles(kept) == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c.name for c in kept[1].tool_calls] == ["post_note", "current_time"]

    # Denied: the side-effecting call does not run, and the model hears why; the harmless call of the same step
    # still runs.
    stack.model.play(call(("post_note", {"text": "do not ship"}), ("current_time", {})),
                     say("Understood, nothing posted."))
    paused = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="Post 'do not ship' on the board."))
    denied = (await stack.chat.ResolveApproval(pb.ResolveApprovalRequest(
        user_id=user, approval_id=paused.pending_approvals[0].approval_id, decision=pb.DECISION_DENY))).response
    assert NOTES == ["ship it"], "a denied call does not run"
    outcome = {t.name: t.error for t in denied.tool_calls}
    assert "denied" in outcome["post_note"] and outcome["current_time"] == ""
    assert denied.response == "Understood, nothing posted."
    results = [json.loads(m.content) for m in stack.model.requests[-1].messages if m.tool_call_id]
    assert "denied" in results[0]["error"] and "error" not in results[1]


def summary_requests(model: ScriptedProvider) -> list:
    return [q for q in model.requests if q.messages[0].content == SUMMARY_PROMPT]


def watch_summary_reads(monkeypatch, before_answer=None) -> dict[str, list]:
    """Record how the summarizer reads a session: `last` (newest n, the usual one call) and `pages` (from the
    first message). `before_answer(call_index)` runs after a newest-n read, before its answer returns."""
    reads: dict[str, list] = {"last": [], "pages": []}
    last, pages = MemoryPeer.last_messages, MemoryPeer.list_messages

    async def last_messages(self, user_id, session_id, n):
        got = await last(self, user_id, session_id, n)
        reads["last"].append(n)
        if before_answer is not None:
            await before_answer(len(reads["last"]))
        return got

    async def list_messages(self, user_id, session_id, page_size, page_token):
        reads["pages"].append(page_size)
        return await pages(self, user_id, session_id, page_size, page_token)

    monkeypatch.setattr(MemoryPeer, "last_messages", last_messages)
    monkeypatch.setattr(MemoryPeer, "list_messages", list_messages)
    return reads


async def test_history_beyond_the_budget_is_folded_into_a_rolling_summary(stack, monkeypatch):
    user = uid()
    reads = watch_summary_reads(monkeypatch)
    off = pb.ChatOptions(disable_recall=True)  # recall brings back old turns by similarity: not what is tested here
    summaries = ["Ana lives in Porto and keeps bees.", "Ana lives in Porto, keeps bees and plays the cello."]
    session, said, found, stored_at = "", [], [], []
    for turn in range(12):  # each turn offers a summary reply: the model gets a summary request once one is due
        message = f"Fact number {turn + 1} about my life: I have visited {turn + 3} cities and read {turn * 7} books."
        stack.model.play(say(f"Noted fact {turn + 1}."), say(summaries[len(found)], prompt_tokens=300,
                                                               completion_tokens=30))
        r = await stack.chat.Chat(pb.ChatRequest(user_id=user, session_id=session, message=message, options=off))
        session = r.session_id
        said += [message, r.response]
        asked = summary_requests(stack.model)
        assert r.usage.model_calls == 1 + len(asked) and stack.model.left == 1 - len(asked)
        if asked:
            found.append(asked[0])
            stored_at.append(len(said))  # the session's messages when this summary was made
            if len(found) == len(summaries):
                break
    assert len(found) == 2, "the history outgrew the budget: the summary was updated twice"

    conversation = (await stack.memory.GetConversation(mpb.GetConversationRequest(
        user_id=user, conversation_id=session))).conversation
    assert conversation.summary == summaries[1]
    covered = int(conversation.metadata["parley_summarized_messages"])
    assert covered >= 2 * SUMMARY_BATCH
    # Each summary request carries the summary so far and only the messages not yet folded in.
    first, second = found
    first_text, second_text = first.messages[1].content, second.messages[1].content
    assert first_text.startswith("Summary so far:\n(none)\n") and not first.tools
    assert second_text.startswith(f"Summary so far:\n{summaries[0]}\n")
    assert first.sampling.max_tokens == 160 and first.sampling.temperature == 0
    folded_first = [m for m in said if m in first_text]
    assert len(folded_first) >= SUMMARY_BATCH and folded_first == said[:len(folded_first)], "oldest first"
    assert f"user: {said[0]}\nassistant: {said[1]}\n" in first_text
    folded_second = [m for m in said if m in second_text]
    assert folded_second == said[len(folded_first):covered], "the second update folds in only what is new"
    rows = await usage_rows(stack, user)
    assert [r.kind for r in rows].count("summary") == 2
    # Each update read the session once: its newest messages back to the first one not yet summarised, not the
    # session from its start.
    assert reads["pages"] == [] and reads["last"] == [stored_at[0], stored_at[1] - len(folded_first)]

    # The next turn's prompt: the summary in the system message, the recent window, no summarised turn.
    stack.model.play(say("You told me several facts."))
    last = "What have I told you so far?"
    await stack.chat.Chat(pb.ChatRequest(user_id=user, session_id=session, message=last, options=off))
    [prompt] = stack.model.requests
    system = prompt.messages[0].content
    assert f"Summary of the earlier conversation:\n{summaries[1]}" in system
    texts = [m.content for m in prompt.messages[1:]]
    assert texts[-1] == last and len(texts) > 2
    assert not any(old in t for old in said[:covered] for t in [system, *texts]), "summarised turns stay out"
    assert texts[:-1] == said[len(said) - len(texts) + 1:], "the newest turns, in order"


async def test_a_summary_made_while_another_writer_stores_reads_the_session_from_its_start(stack, monkeypatch):
    """The newest-n read is checked against the session's count: another writer storing in between shifts what
    the newest n are, and the summarizer then reads the session by position from its start."""
    user, off, session = uid(), pb.ChatOptions(disable_recall=True), ""

    async def another_writer(call: int) -> None:
        await stack.memory.AppendMessages(mpb.AppendMessagesRequest(
            user_id=user, conversation_id=session,
            messages=[mpb.NewMessage(role=mpb.ROLE_USER, content="Written by another client.")]))

    reads = watch_summary_reads(monkeypatch, another_writer)
    said, asked = [], []
    for turn in range(12):
        message = f"Fact number {turn + 1} about my life: I have visited {turn + 3} cities and read {turn * 7} books."
        stack.model.play(say(f"Noted fact {turn + 1}."), say("Ana has facts.", prompt_tokens=300, completion_tokens=30))
        r = await stack.chat.Chat(pb.ChatRequest(user_id=user, session_id=session, message=message, options=off))
        session = r.session_id
        said += [message, r.response]
        asked = summary_requests(stack.model)
        if asked:
            break
    assert asked, "the history outgrew the budget"
    assert len(reads["last"]) == 1 and reads["pages"], "the newest-n read was stale: read from the start"
    conversation = (await stack.memory.GetConversation(mpb.GetConversationRequest(
        user_id=user, conversation_id=session))).conversation
    covered = int(conversation.metadata["parley_summarized_messages"])
    folded = asked[0].messages[1].content
    assert [m for m in said if m in folded] == said[:covered] and "Written by another client." not in folded


async def test_a_session_window_is_reused_until_another_writer_stores_in_the_session(stack):
    user, off = uid(), pb.ChatOptions(disable_recall=True)

    def windows(result: str) -> float:
        return stack.metrics.registry.get_sample_value("parley_chat_window_cache_total", {"result": result}) or 0.0

    stack.model.play(say("First answer."), say("Second answer."))
    first = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="My first note.", options=off))
    hits = windows("hit")
    await stack.chat.Chat(pb.ChatRequest(user_id=user, session_id=first.session_id, message="My second note.",
                                         options=off))
    assert windows("hit") == hits + 1, "the window the first turn left, not read again"
    second = stack.model.requests[-1]
    assert [m.content for m in second.messages[1:]] == ["My first note.", "First answer.", "My second note."]

    await stack.memory.AppendMessages(mpb.AppendMessagesRequest(  # another writer, behind the chat's back
        user_id=user, conversation_id=first.session_id,
        messages=[mpb.NewMessage(role=mpb.ROLE_USER, content="A note stored by another client.")]))
    stack.model.play(say("Third answer."))
    misses = windows("miss")
    await stack.chat.Chat(pb.ChatRequest(user_id=user, session_id=first.session_id, message="My third note.",
                                         options=off))
    assert windows("miss") == misses + 1, "the session's message count gave the other writer away"
    [third] = stack.model.requests
    assert [m.content for m in third.messages[1:]] == [
        "My first note.", "First answer.", "My second note.", "Second answer.", "A note stored by another client.",
        "My third note."], "read again: the other writer's message is in the window"


async def test_recall_leaves_out_the_window_and_finds_what_slid_out_of_it_in_one_call(stack):
    """Recall starts before the window is known. With the session's window cached, its one call leaves out what
    surely stays in the window and asks for one more hit per message that may slide out: the message that the
    question pushes out of the window (history budget: 64 tokens) is recalled by the same turn."""
    user = uid()
    cat = "My cat is called Biscuit, a small orange tabby who sleeps in the sun on the balcony all afternoon."  # 23
    filler = "Unrelated: the weather report for tomorrow says rain in the morning and clear skies later on."  # 18
    question = "What is my cat called? I keep forgetting the name of the little orange one who sleeps outside."  # 20

    def recalls() -> float:
        return stack.metrics.registry.get_sample_value("parley_grpc_requests_total", {
            "service": "parley.memory.v1.MemoryService", "method": "Recall", "code": "OK"}) or 0.0

    async def turn(session_id: str, message: str) -> tuple[pb.ChatResponse, list[str], float]:
        stack.model.play(say("Noted."))  # 2 tokens
        before = recalls()
        r = await stack.chat.Chat(pb.ChatRequest(user_id=user, session_id=session_id, message=message))
        [prompt] = stack.model.requests
        window = [m.content for m in prompt.messages[1:]]
        assert not {m.content for m in r.memory} & set(window), "nothing recalled is in the window"
        return r, window, recalls() - before

    first, _, calls = await turn("", cat)
    assert calls == 1
    _, window, calls = await turn(first.session_id, filler)
    assert window == [cat, "Noted.", filler] and calls == 1
    polled, counted = 0, recalls()
    for _ in range(100):  # the first message's vector is stored moments after its turn
        found = await stack.memory.Recall(mpb.RecallRequest(user_id=user, query=question, top_k=10))
        polled += 1
        if any(h.message.content == cat for h in found.results):
            break
        await asyncio.sleep(0.05)
    # gRPC counts a call once its answer has gone out: these polls must not be counted as the next turn's
    await eventually(lambda: recalls() >= counted + polled)
    r, window, calls = await turn(first.session_id, question)
    assert window == ["Noted.", filler, "Noted.", question], "the question pushed the first message out"
    assert cat in [m.content for m in r.memory], list(r.memory)
    assert calls == 1, "the cached window told the one call what to leave out"

    await stack.memory.AppendMessages(mpb.AppendMessagesRequest(  # another writer: the cached window is stale
        user_id=user, conversation_id=first.session_id,
        messages=[mpb.NewMessage(role=mpb.ROLE_USER, content="A note about my cat stored by another client.")]))
    r, window, _ = await turn(first.session_id, "Tell me about my cat again.")
    assert window[-2:] == ["A note about my cat stored by another client.", "Tell me about my cat again."]
    assert cat in [m.content for m in r.memory], list(r.memory)


async def test_model_calls_are_accounted_even_when_the_answer_cannot_be_stored(stack):
    """The answer is stored while the turn is accounted: a failed store does not lose what the calls cost."""
    user = uid()
    stack.model.play(say("Hello."))
    first = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="Hi there."))
    stack.model.play(call(("slow_echo", {"text": "wait"}), prompt_tokens=120, completion_tokens=7),
                     say("Echoed.", prompt_tokens=150, completion_tokens=5))
    turn = asyncio.ensure_future(stack.chat.Chat(pb.ChatRequest(
        user_id=user, session_id=first.session_id, message="Echo something slowly.")))
    await asyncio.sleep(0.15)  # the tool is sleeping: the session goes away under the turn
    await stack.memory.DeleteConversation(mpb.DeleteConversationRequest(
        user_id=user, conversation_id=first.session_id))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await turn
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND, failed.value.details()
    rows = [(r.kind, r.prompt_tokens, r.completion_tokens) for r in await usage_rows(stack, user)]
    assert rows == [("generate", 100, 10), ("generate", 120, 7), ("generate", 150, 5)], "both calls of the turn"


async def test_plugin_route_mistakes_fail_at_start(plugins):
    def config(**route) -> InferenceSettings:
        return InferenceSettings(local_enabled=False, default_model="m", routes=[{"name": "m", **route}])

    with pytest.raises(RouteError, match="needs `plugin`"):
        load_routes(config(provider="plugin"))
    with pytest.raises(RouteError, match="only a plugin route"):
        load_routes(config(provider="openai", plugin="scripted"))
    with pytest.raises(RouteError, match="route 'm': no 'parley.inference.providers' entry point named 'nope'"):
        await build_core(config(provider="plugin", plugin="nope"), InferenceMetrics(Metrics()))
    core, _ = await build_core(config(provider="plugin", plugin="scripted", native_tools=False),
                               InferenceMetrics(Metrics()))
    [model] = await core.list_models()
    assert (model.name, model.provider, model.native_tool_calling, model.reachable) == ("m", "plugin", False, True)
    assert isinstance(core.backends["m"].provider, ScriptedProvider)
    PROVIDERS.pop("m", None)


async def test_a_message_over_the_history_budget_still_reaches_the_model(stack):
    """The history budget (64 tokens here) bounds the window of past turns; the message itself is always sent."""
    long = "Please keep all of this in mind: " + " ".join(f"item-{i}" for i in range(120))
    stack.model.play(say("Kept in mind."))
    r = await stack.chat.Chat(pb.ChatRequest(user_id=uid(), message=long, options=pb.ChatOptions(disable_recall=True)))
    assert r.response == "Kept in mind."
    [prompt] = stack.model.requests
    assert [m.content for m in prompt.messages[1:]] == [long]


async def test_each_part_of_a_paused_turn_reports_its_own_tool_calls(stack):
    """A tool that ran before the pause is reported by the paused response, not again by the resumed one."""
    user = uid()
    NOTES.clear()
    stack.model.play(call(("calculator", {"expression": "6 * 7"})), call(("post_note", {"text": "42"})))
    paused = await stack.chat.Chat(pb.ChatRequest(user_id=user, message="Compute 6*7, then post it."))
    assert [t.name for t in paused.tool_calls] == ["calculator"] and len(paused.pending_approvals) == 1
    stack.model.play(say("Posted 42."))
    done = (await stack.chat.ResolveApproval(pb.ResolveApprovalRequest(
        user_id=user, approval_id=paused.pending_approvals[0].approval_id, decision=pb.DECISION_APPROVE))).response
    assert [t.name for t in done.tool_calls] == ["post_note"] and NOTES == ["42"]
    rows = await usage_rows(stack, user)
    assert [r.tool_called for r in rows] == ["calculator", "calculator", "post_note"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_model_call_that_every_provider_failed_is_not_retried_by_the_chat_service(stack, streamed):
    """The inference service retries a failing provider itself (max_retries, then the fallbacks). Its UNAVAILABLE
    "no provider could serve" is final: the chat service's channel must not run the whole chain again (gRPC's
    retry policy retries UNAVAILABLE for the other services' methods)."""
    method = "StreamGenerate" if streamed else "Generate"

    def attempts() -> float:
        return stack.metrics.registry.get_sample_value("parley_grpc_requests_total", {
            "service": "parley.inference.v1.InferenceService", "method": method, "code": "UNAVAILABLE"}) or 0.0

    stack.model.play(*[fail() for _ in range(20)])
    before = attempts()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if streamed:
            [e async for e in stack.chat.StreamChat(pb.StreamChatRequest(user_id=uid(), message="Hello?"))]
        else:
            await stack.chat.Chat(pb.ChatRequest(user_id=uid(), message="Hello?"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no provider could serve" in info.value.details(), info.value.details()
    assert attempts() - before == 1, "one call to the inference service"
    assert len(stack.model.requests) == 1 + InferenceSettings().max_retries, "the provider was tried, and retried"
