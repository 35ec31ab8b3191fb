"""Routing questions to tools by embedding similarity (the small-model path), with the real model and tools."""

import pytest

from parley.runtime.embeddings import Embedder
from parley.tools.v1 import tools_pb2 as tpb
from services.chat.router import ToolRouter
from services.tools.builtin.calculator import Calculator
from services.tools.builtin.clock import CurrentTime
from services.tools.builtin.knowledge import KnowledgeSearch
from services.tools.builtin.sales_report import SalesReport

SEND_EMAIL = tpb.Tool(name="send_email", description="Send an email to someone. Use it for requests like 'send an "
                      "email to ana@example.com saying hello' or 'email Bob that the meeting moved to Friday'.")


@pytest.fixture(scope="module")
async def router():
    embedder = await Embedder.load(None, 64, 2)
    embedder.start()
    yield ToolRouter(embedder, threshold=0.45, margin=0.03)
    await embedder.close()


TOOLS = [tpb.Tool(name=c.spec.name, description=c.spec.description)
         for c in (SalesReport, Calculator, CurrentTime, KnowledgeSearch)] + [SEND_EMAIL]


@pytest.mark.parametrize("question, tool", [
    ("How many sales did we close last month?", "sales_report"),
    ("How many deals did we close last month, by region?", "sales_report"),
    ("What time is it in Tokyo?", "current_time"),
    ("Send an email to bob@example.com saying the report is ready.", "send_email"),
    ("What is my name?", None),
    ("My name is Ana. Remember it.", None),
    ("Say hello in one short sentence.", None),
    ("Give me a short greeting.", None),
    ("Which city is my favourite?", None),
])
async def test_routes(router, question, tool):
    route = await router.route(question, TOOLS)
    assert (route.tool.name if route else None) == tool
