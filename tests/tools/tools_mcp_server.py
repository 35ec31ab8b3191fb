"""A real MCP server (official SDK) for the tests: `python tools_mcp_server.py` serves stdio;
`serve_http(sock)` serves streamable HTTP on a bound socket."""

from __future__ import annotations

import asyncio
import socket

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

app = MCPServer("parley-test", log_level="CRITICAL")  # no tracebacks on stderr for expected failures


@app.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@app.tool()
def remember(note: str) -> str:
    """Stores a note (a tool with side effects)."""
    return f"stored: {note}"


@app.tool()
def explode(reason: str) -> str:
    """Always fails."""
    raise ValueError(reason)


@app.tool(annotations=ToolAnnotations(read_only_hint=True))
async def wait(seconds: float) -> str:
    """Sleeps, then answers."""
    await asyncio.sleep(seconds)
    return "done"


def serve_http(sock: socket.socket) -> None:
    """Serve streamable HTTP on `sock` until the process ends (run in a thread)."""
    import uvicorn

    config = uvicorn.Config(app.streamable_http_app(), log_level="warning", lifespan="on")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    app.run()
