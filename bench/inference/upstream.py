"""A minimal OpenAI-compatible upstream that answers at once (the benchmark's and tests' fixed point).

`POST /v1/chat/completions` answers a fixed completion of `tokens` words, unary or as an SSE stream
(text chunks, a finish chunk, then the usage chunk the OpenAI API sends with
`stream_options.include_usage`, then `[DONE]`). `GET /v1/models` lists one model. With `status`
set it answers every request with that HTTP status and an OpenAI-style error body instead.
Plain asyncio, HTTP/1.1 keep-alive, so that the upstream costs as little as possible.

Run alone: `python -m bench.inference.upstream --port 8099 [--tokens 8] [--status 503]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass
class Upstream:
    tokens: int = 8
    status: int = 200
    prompt_tokens: int = 11
    fail_first: int = 0  # answer `status` to this many requests, then 200
    delay_s: float = 0.0  # wait before answering (timeouts)
    requests: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    keep_bodies: bool = False
    _server: asyncio.AbstractServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Upstream:
        self._server = await asyncio.start_server(self._serve, host, port, backlog=1024)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- HTTP ---------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                status, content_type, payload = self._answer(method, path, body)
                writer.write(
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\ncontent-type: {content_type}\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode() + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass  # the client went away, or the server is closing
        finally:
            writer.close()

    def _answer(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        self.requests += 1
        if self.status != 200 and (not self.fail_first or self.requests <= self.fail_first):
            error = {"error": {"message": f"upstream answers {self.status}", "type": "server_error", "code": None}}
            return self.status, "application/json", json.dumps(error).encode()
        if method == "GET" and path.endswith("/models"):
            data = {"object": "list", "data": [{"id": "instant", "object": "model", "created": 0, "owned_by": "bench"}]}
            return 200, "application/json", json.dumps(data).encode()
        if method != "POST" or not path.endswith("/chat/completions"):
            return 404, "application/json", b'{"error": {"message": "not found", "type": "invalid_request_error"}}'
        request = json.loads(body)
        if self.keep_bodies:
            self.bodies.append(request)
        model = request.get("model", "instant")
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                 "total_tokens": self.prompt_tokens + self.tokens, "prompt_tokens_details": {"cached_tokens": 0}}
        created = int(time.time())
        if not request.get("stream"):
            data = {
                "id": "chatcmpl-instant", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * self.tokens},
                             "finish_reason": "stop"}],
                "usage": usage,
            }
            return 200, "application/json", json.dumps(data).encode()
        base = {"id": "chatcmpl-instant", "object": "chat.completion.chunk", "created": created, "model": model}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        events += [{**base, "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
                   for _ in range(self.tokens)]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return 200, "text/event-stream", payload.encode()


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    upstream = await Upstream(tokens=args.tokens, status=args.status).start(args.host, args.port)
    print(f"listening on {upstream.base_url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main())
