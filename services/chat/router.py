"""Tool routing by embedding similarity, for models that cannot decide to call tools themselves.

Each tool is represented by several texts (its name, and each sentence or line of its
description); a question's score for a tool is its best cosine similarity with any of
them. The best tool is chosen when it clears `threshold` and beats the runner-up by
`margin`; otherwise the model answers without tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from parley.runtime.embeddings import Embedder
from parley.tools.v1 import tools_pb2 as tpb

_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Route:
    tool: tpb.Tool
    score: float


def tool_texts(tool: tpb.Tool) -> list[str]:
    name = tool.name.replace("_", " ").replace("-", " ")
    parts = [p.strip() for p in _SPLIT.split(tool.description) if len(p.strip()) > 8]
    return [name, *(f"{name}: {p}" for p in parts)]


class ToolRouter:
    def __init__(self, embedder: Embedder, threshold: float, margin: float) -> None:
        self._embedder = embedder
        self.threshold = threshold
        self.margin = margin
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    async def _vectors(self, tool: tpb.Tool) -> np.ndarray:
        key = (tool.name, tool.description)
        if key not in self._cache:
            self._cache[key] = await self._embedder.embed(tool_texts(tool))
        return self._cache[key]

    async def scores(self, question: str, tools: list[tpb.Tool]) -> list[tuple[tpb.Tool, float]]:
        q = (await self._embedder.embed([question]))[0]
        scored = [(t, float(np.max((await self._vectors(t)) @ q))) for t in tools]
        return sorted(scored, key=lambda pair: -pair[1])

    async def route(self, question: str, tools: list[tpb.Tool]) -> Route | None:
        if not tools:
            return None
        ranked = await self.scores(question, tools)
        best_tool, best = ranked[0]
        runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
        if best >= self.threshold and best - runner_up >= self.margin:
            return Route(best_tool, best)
        return None
