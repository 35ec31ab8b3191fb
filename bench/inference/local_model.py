"""The local model through the full gRPC path vs llama.cpp called directly.

(a) `parley serve inference` (its own process, the default SmolLM2-135M-Instruct, default settings)
    streamed over gRPC: time to first token seen by the client, and decode tokens/s;
(b) llama-cpp-python in this process on the same GGUF, same context size, threads, chat template,
    system prompt and greedy decoding: time to the first sampled token and decode tokens/s.
Each repetition uses a different user message (no prompt-cache hit beyond the shared system turn,
alike on both paths). The paths alternate, one request at a time, so they never share the cores and
both see the same machine.

    .venv/bin/python -m bench.inference.local_model [--reps 9] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import grpc

from bench.common import table
from bench.inference import procs
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc
from parley.runtime.config import InferenceSettings, packaged_local_model_path

QUESTION = "({i}) Write a short paragraph about the sea and the ships on it."


async def parley_once(stub, i: int, max_tokens: int) -> tuple[float, float]:
    request = pb.StreamGenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content=QUESTION.format(i=i))],
                                       sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0))
    started, first, final = time.perf_counter(), None, None
    async for event in stub.StreamGenerate(request):
        if first is None and event.WhichOneof("event") in ("delta", "tool_call"):
            first = time.perf_counter()
        if event.WhichOneof("event") == "final":
            final = event.final.response
    ended = time.perf_counter()
    assert final is not None and first is not None
    return (first - started) * 1000, (final.usage.completion_tokens - 1) / (ended - first)


class Direct:
    """llama-cpp-python on the same GGUF with Parley's default settings, chat template and system prompt."""

    def __init__(self) -> None:
        import llama_cpp

        from services.inference.providers.llama_engine import default_threads
        from services.inference.tokens import GgufTokenizer

        self.settings = InferenceSettings()
        threads = self.settings.local_n_threads or default_threads(1)
        self.llm = llama_cpp.Llama(model_path=packaged_local_model_path(), n_ctx=self.settings.local_n_ctx,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.tokenizer = GgufTokenizer(self.llm)
        self.is_eog = lambda token: llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token)

    def once(self, i: int, max_tokens: int) -> tuple[float, float]:
        chat = [{"role": "system", "content": self.settings.local_system_prompt},
                {"role": "user", "content": QUESTION.format(i=i)}]
        started = time.perf_counter()
        tokens = self.tokenizer.tokenize(self.tokenizer.render(chat))
        first, n = None, 0
        for token in self.llm.generate(tokens, top_k=40, top_p=0.95, min_p=0.05, temp=0.0, repeat_penalty=1.0):
            if self.is_eog(token):
                break
            self.llm.detokenize([token])
            n += 1
            if first is None:
                first = time.perf_counter()
            if n >= max_tokens:
                break
        ended = time.perf_counter()
        return (first - started) * 1000, (n - 1) / (ended - first)


async def alternate(address: str, reps: int, max_tokens: int) -> tuple[list, list]:
    """One Parley run, one direct run, and so on: both paths see the same (shared, noisy) machine."""
    direct, parley = Direct(), []
    llama: list[tuple[float, float]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for i in range(-1, reps):  # -1: warm-up
            p = await parley_once(stub, i, max_tokens)
            await asyncio.sleep(0.3)  # let llama.cpp's worker threads of the other path go idle
            d = direct.once(i, max_tokens)
            await asyncio.sleep(0.3)
            if i >= 0:
                parley.append(p)
                llama.append(d)
    direct.llm.close()
    return llama, parley


def main() -> None:
    parser = argparse.ArgumentParser(description="Local model: full gRPC path vs llama.cpp directly")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    port = procs.free_port()
    with procs.parley(port, None, local=True, log_level="WARNING") as server:
        procs.wait_serving(f"127.0.0.1:{port}", server)
        llama, parley = asyncio.run(alternate(f"127.0.0.1:{port}", args.reps, args.max_tokens))
    rows = []
    for name, runs in (("llama.cpp directly", llama), ("Parley, gRPC stream", parley)):
        ttfts, speeds = [r[0] for r in runs], [r[1] for r in runs]
        rows.append((name, f"{statistics.median(ttfts):.1f}", f"{min(ttfts):.1f}",
                     f"{statistics.median(speeds):.1f}", f"{max(speeds):.1f}"))
    print(f"SmolLM2-135M-Instruct Q4_1, {os.cpu_count()} cores, {args.max_tokens} tokens greedy, {args.reps} "
          "alternating runs per path (median; best = least disturbed by other load)")
    print(table(rows, ("path", "TTFT ms median", "TTFT ms best", "decode tok/s median", "decode tok/s best")))
    for label, pick_ttft, pick_tps in (("median", statistics.median, statistics.median), ("best", min, max)):
        base_ttft, base_tps = pick_ttft(r[0] for r in llama), pick_tps(r[1] for r in llama)
        ttft, tps = pick_ttft(r[0] for r in parley), pick_tps(r[1] for r in parley)
        print(f"Parley vs direct ({label}): time to first token {ttft - base_ttft:+.1f} ms, "
              f"decode {tps / base_tps:.2f}x the direct tokens/s")


if __name__ == "__main__":
    main()
