"""knowledge_search against the real memory service: hybrid search, sources, scoped to the executing user."""

from __future__ import annotations

import grpc
import pytest

from parley.memory.v1 import memory_pb2, memory_pb2_grpc
from parley.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.tools.tools_support import content, execute

HANDBOOK = (
    "Travel policy. Employees book flights through the travel portal at least 14 days ahead. "
    "Economy class is the default for flights under six hours; business class needs a director's approval.\n\n"
    "Expense reports are filed within 30 days of the trip, with receipts for every item above 25 euros."
)
RECIPE = "Grandma's pancakes: 200 g flour, 2 eggs, 300 ml milk, a pinch of salt. Rest the batter 30 minutes."


@pytest.fixture(scope="module")
async def stubs(start_stack):
    async with start_stack(["memory", "tools"]) as app:
        async with grpc.aio.insecure_channel(app.address) as channel:
            yield memory_pb2_grpc.MemoryServiceStub(channel), tools_pb2_grpc.ToolsServiceStub(channel)


async def test_knowledge_search_returns_chunks_with_sources_for_the_user_only(stubs):
    memory, tools = stubs
    await memory.IngestDocument(memory_pb2.IngestDocumentRequest(
        user_id="kb-owner", title="Employee handbook", source="https://intranet.example/handbook", content=HANDBOOK
    ))
    await memory.IngestDocument(memory_pb2.IngestDocumentRequest(
        user_id="kb-other", title="Recipes", source="notes/pancakes.md", content=RECIPE
    ))

    found = content(await execute(tools, "knowledge_search", {"query": "Which class can I fly in?", "top_k": 3},
                                  user_id="kb-owner"))
    assert found["results"], found
    best = found["results"][0]
    assert best["title"] == "Employee handbook" and best["source"] == "https://intranet.example/handbook"
    assert "business class" in best["content"] and best["document_id"] and best["score"] > 0
    assert all(r["title"] != "Recipes" for r in found["results"])  # another user's private document

    other = content(await execute(tools, "knowledge_search", {"query": "pancakes flour eggs"}, user_id="kb-owner"))
    assert all(r["title"] != "Recipes" for r in other["results"])
    mine = content(await execute(tools, "knowledge_search", {"query": "pancakes flour eggs"}, user_id="kb-other"))
    assert mine["results"][0]["source"] == "notes/pancakes.md"


async def test_knowledge_search_arguments_are_checked(stubs):
    _, tools = stubs
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execute(tools, "knowledge_search", {"query": "", "top_k": 500})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "should be non-empty" in details and "500 is greater than the maximum of 20" in details
    assert (await execute(tools, "knowledge_search", {"query": "x"})).outcome == tools_pb2.OUTCOME_OK
