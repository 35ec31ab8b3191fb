"""The floor of the proxy benchmark: the least a Python gRPC service pays to relay a streamed completion.

It answers `parley.inference.v1.InferenceService/StreamGenerate` with the messages Parley sends for the
benchmark's request (one text delta, then the final event, here with only the upstream's usage), on the
same stack (`grpc.aio` on uvloop, aiohttp to the upstream, Parley's event-stream decoder), and does
nothing else: no validation, routing, retries, fallbacks, cooldowns, metrics, logs, prices or usage
checks, and it does not stream the text as it comes but sends it once the upstream is done. Not a
product: a yardstick. What a path through it adds over the raw client is the least any Python gRPC proxy
adds on this machine; what Parley adds over it is the price of Parley's features.

    python -m bench.inference.floor --port 50099 --upstream http://127.0.0.1:8099/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc
from services.inference.providers.openai_compat import sse_data


class FloorServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, upstream: str) -> None:
        self._url = f"{upstream.rstrip('/')}/chat/completions"
        self._session: aiohttp.ClientSession | None = None  # made on the server's loop, at the first call

    async def StreamGenerate(self, request: pb.StreamGenerateRequest, context):
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
        body = json.dumps({"model": request.model, "max_tokens": request.sampling.max_tokens, "stream": True,
                           "messages": [{"role": "user", "content": m.content} for m in request.messages],
                           "stream_options": {"include_usage": True}}).encode()
        texts, usage = [], {}
        async with self._session.post(self._url, data=body, headers={"Content-Type": "application/json"}) as answer:
            async for data in sse_data(answer.content.iter_any()):
                if data.startswith("[DONE]"):
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                texts += [c["delta"]["content"] for c in chunk.get("choices") or ()
                          if c.get("delta", {}).get("content")]
        yield pb.StreamGenerateResponse(delta=pb.TextDelta(text="".join(texts)))
        usage_pb = pb.Usage(prompt_tokens=usage.get("prompt_tokens", 0),
                            completion_tokens=usage.get("completion_tokens", 0),
                            total_tokens=usage.get("total_tokens", 0))
        yield pb.StreamGenerateResponse(final=pb.StreamFinal(response=pb.GenerateResponse(
            model=request.model, provider="floor", usage=usage_pb)))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def serve(port: int, upstream: str) -> None:
    servicer = FloorServicer(upstream)
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()  # the benchmark waits for SERVING, as with Parley
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"floor listening on 127.0.0.1:{port}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await servicer.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, e.g. http://127.0.0.1:8099/v1")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as `parley serve` runs
        runner.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
