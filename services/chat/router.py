"""Tool routing by embedding similarity, for models that cannot decide to call tools themselves.

Each tool is represented by several texts: its name, each sentence of its description,
and each example request quoted in it. A question's score for a tool is its best cosine
similarity with any of them, plus a small bonus for each word of the tool's name the
question uses. A "no tool" route competes too: everyday conversation (greetings, telling
or asking one's name, small talk) is represented by anchor utterances, so "Say hello"
does not reach a tool whose example says "saying hello". The best tool is chosen when it
clears `threshold`, beats the runner-up tool by `margin`, and beats the no-tool route by
`margin`; otherwise the model answers without tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from parley.runtime.embeddings import Embedder
from parley.tools.v1 import tools_pb2 as tpb

_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
NAME_BONUS = 0.15
NO_TOOL_ANCHORS = (
    "hello", "hi, how are you?", "say hello", "give me a short greeting", "good morning", "thank you",
    "my name is Sam, please remember it", "what is my name?", "remember that I like tea", "what do I like?",
    "tell me about yourself", "tell me a fun fact", "write a short poem", "explain how rainbows form",
    "what do you think?", "can you help me?",
)
_WORD = re.compile(r"[a-z0-9]+")
_QUOTED = re.compile(r"'([^']{6,})'|\"([^\"]{6,})\"")


@dataclass
class Route:
    tool: tpb.Tool
    score: float


def tool_texts(tool: tpb.Tool) -> list[str]:
    """The name, each sentence of the description, and each quoted example request on its own."""
    name = tool.name.replace("_", " ").replace("-", " ")
    parts = [p.strip() for p in _SPLIT.split(tool.description) if len(p.strip()) > 8]
    examples = [a or b for a, b in _QUOTED.findall(tool.description)]
    return [name, *(f"{name}: {p}" for p in parts), *examples]


def _stems(text: str) -> set[str]:
    return {w[:4] for w in _WORD.findall(text.lower())}


def name_bonus(tool: tpb.Tool, question: str) -> float:
    words = _stems(tool.name.replace("_", " ").replace("-", " "))
    return NAME_BONUS * len(words & _stems(question)) / len(words) if words else 0.0


class ToolRouter:
    def __init__(self, embedder: Embedder, threshold: float, margin: float) -> None:
        self._embedder = embedder
        self.threshold = threshold
        self.margin = margin
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self._anchors: np.ndarray | None = None

    async def _vectors(self, tool: tpb.Tool) -> np.ndarray:
        key = (tool.name, tool.description)
        if key not in self._cache:
            self._cache[key] = await self._embedder.embed(tool_texts(tool))
        return self._cache[key]

    async def scores(self, question: str, tools: list[tpb.Tool]) -> tuple[list[tuple[tpb.Tool, float]], float]:
        """Tools by score, best first, and the score of the no-tool route."""
        q = (await self._embedder.embed([question]))[0]
        scored = [(t, float(np.max((await self._vectors(t)) @ q)) + name_bonus(t, question)) for t in tools]
        if self._anchors is None:
            self._anchors = await self._embedder.embed(list(NO_TOOL_ANCHORS))
        return sorted(scored, key=lambda pair: -pair[1]), float(np.max(self._anchors @ q))

    async def route(self, question: str, tools: list[tpb.Tool]) -> Route | None:
        if not tools:
            return None
        ranked, no_tool = await self.scores(question, tools)
        best_tool, best = ranked[0]
        runner_up = max(ranked[1][1] if len(ranked) > 1 else 0.0, no_tool)
        if best >= self.threshold and best - runner_up >= self.margin:
            return Route(best_tool, best)
        return None
