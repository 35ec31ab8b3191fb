"""knowledge_search: hybrid (vector + full-text) search over the memory service's documents.

The search runs as the executing user: the memory service returns only that user's
own and shared documents.
"""

from __future__ import annotations

from typing import Any

from parley.memory.v1 import memory_pb2
from parley.runtime.clients import Client
from parley.runtime.errors import InvalidArgument, ParleyError
from services.tools.core import CallContext, Tool, ToolError, ToolSpec

MAX_TOP_K = 20

SCHEMA = {
    "type": "object",
    "properties": {
        "query": {
            "type": "string",
            "minLength": 1,
            "maxLength": 1000,
            "description": "What to look for, in natural language or keywords.",
        },
        "top_k": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_TOP_K,
            "default": 5,
            "description": "How many passages to return.",
        },
    },
    "required": ["query"],
    "additionalProperties": False,
}


class KnowledgeSearch(Tool):
    spec = ToolSpec(
        name="knowledge_search",
        description=(
            "Searches the knowledge base (documents, manuals, policies, notes the user or the company uploaded) "
            "and returns the most relevant passages with their title and source. Use it to answer questions "
            "about internal documents, products, procedures or anything the user says is written down, and "
            "cite the sources."
        ),
        parameters=SCHEMA,
        timeout_s=15.0,
    )

    def __init__(self, memory: Client) -> None:
        self._memory = memory

    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        request = memory_pb2.SearchDocumentsRequest(
            user_id=call.user_id, query=args["query"], top_k=args.get("top_k", 5)
        )
        try:
            response = await self._memory.call("SearchDocuments", request)
        except InvalidArgument as exc:
            raise ToolError(f"the knowledge base rejected the search: {exc.message}") from None
        except ParleyError as exc:
            raise ToolError(f"the knowledge base is unavailable right now ({exc.reason})") from None
        return {
            "query": args["query"],
            "results": [
                {
                    "content": chunk.content,
                    "title": chunk.title,
                    "source": chunk.source,
                    "document_id": chunk.document_id,
                    "chunk_index": chunk.chunk_index,
                    "score": round(float(chunk.score), 4),
                }
                for chunk in response.chunks
            ],
        }
