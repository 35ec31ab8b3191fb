"""llama.cpp behind asyncio: a pool of `Llama` instances, each used by one generation at a time.

llama.cpp calls block, so each generation runs in a worker thread and hands its text to the event
loop through an asyncio queue. An instance goes back to the pool only when its thread has finished,
even when the caller went away (the thread stops at the next token).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from parley.runtime.errors import InvalidArgument, ResourceExhausted
from parley.runtime.logging import get_logger
from services.inference.tokens import GgufTokenizer

_log = get_logger(__name__)
_END = object()


@dataclass(slots=True)
class Params:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: Any = None  # llama_cpp.LlamaGrammar


@dataclass(slots=True)
class Outcome:
    completion_tokens: int = 0
    reason: str = "stop"  # stop | length | cancelled
    cached_prompt_tokens: int = 0
    first_token_at: float | None = None  # perf_counter() of the first sampled token


# llama-cpp-python's converter lets a JSON string hold any character but `"` and `\`, control characters
# included, which JSON forbids unescaped: the local model once wrote a raw newline into a tool argument, and the
# call did not parse. llama.cpp's own converter excludes them; so does this rule.
_ANY_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def json_gbnf(schema_json: str) -> str:
    """The GBNF grammar of JSON valid against the schema, strings without raw control characters."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema_json).replace(_ANY_CHAR, _JSON_CHAR)


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str):
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(json_gbnf(schema_json), verbose=False)


def grammar_for(schema: dict[str, Any], field: str):
    """A llama.cpp grammar for JSON valid against `schema` (cached by schema); INVALID_ARGUMENT naming
    `field` when llama.cpp's converter cannot express the schema."""
    try:
        return _grammar(json.dumps(schema, sort_keys=True, separators=(",", ":")))
    except Exception as exc:  # the converter raises many kinds on unsupported schemas
        why = f"the local model cannot constrain its output to this schema ({type(exc).__name__}: {exc})"
        raise InvalidArgument(message=f"{field}: {why}", violations={field: why}) from None


class _StopScanner:
    """Finds stop sequences across token boundaries and holds back text that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit, and whether a stop sequence was hit (text before it is returned)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def default_threads(instances: int) -> int:
    """Threads per instance when not configured: every core but one, shared among the instances.

    The spare core is for this process's event loop (which streams every token) and its neighbours:
    llama.cpp's OpenMP threads spin-wait between steps, so a team as large as the machine stalls
    whenever one of its threads is descheduled (measured in docs/inference.md).
    """
    return max(1, ((os.cpu_count() or 1) - 1) // instances)


class LlamaEngine:
    """`size` llama.cpp instances of one GGUF, and its tokenizer."""

    def __init__(self, path: str, n_ctx: int, n_threads: int, size: int, max_waiting: int) -> None:
        from llama_cpp import Llama

        threads = n_threads or default_threads(size)
        self.path, self.n_ctx, self._max_waiting = path, n_ctx, max_waiting
        self._llamas = [
            Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
            for _ in range(size)
        ]
        self.tokenizer = GgufTokenizer(self._llamas[0])
        self._free = list(self._llamas)
        self._slots = asyncio.Semaphore(size)
        self._waiting = 0
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="llama")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for llm in self._llamas:
            llm.close()

    # -- generation -------------------------------------------------------------------------------
    async def generate(self, tokens: list[int], params: Params, outcome: Outcome) -> AsyncIterator[str]:
        """Text pieces of one generation; `outcome` is filled in when the iterator ends."""
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise ResourceExhausted(
                message=f"the local model is busy: {self._waiting} requests are already waiting",
                retry_after_s=1.0,
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        llm = self._free.pop()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def release(_future: Any) -> None:
            self._free.append(llm)
            self._slots.release()

        future = loop.run_in_executor(self._executor, self._decode, llm, tokens, params, outcome, emit, cancel)
        future.add_done_callback(release)
        try:
            while (item := await queue.get()) is not _END:
                yield item
            await future  # re-raises a failure of the worker
        finally:
            cancel.set()  # the thread stops at its next token; wait so `outcome` is final
            await asyncio.wait([future])

    def _decode(self, llm: Any, tokens: list[int], params: Params, outcome: Outcome,
                emit: Callable[[Any], None], cancel: threading.Event) -> None:
        import llama_cpp

        try:
            outcome.cached_prompt_tokens = _common_prefix(llm, tokens)
            llm.set_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"))
            vocab = llm._model.vocab
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            scanner = _StopScanner(params.stop)
            room = self.n_ctx - len(tokens)
            n = 0
            outcome.reason = "length"
            for token in llm.generate(tokens, top_k=40, top_p=params.top_p, min_p=0.05, temp=params.temperature,
                                      repeat_penalty=1.0, grammar=params.grammar):
                if cancel.is_set():
                    outcome.reason = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    outcome.reason = "stop"
                    break
                n += 1
                if n == 1:
                    outcome.first_token_at = time.perf_counter()
                text, stopped = scanner.feed(decoder.decode(llm.detokenize([token])))
                if text:
                    emit(text)
                if stopped:
                    outcome.reason = "stop"
                    break
                if n >= params.max_tokens or n >= room:
                    break
            tail = scanner.flush() + decoder.decode(b"", final=True)
            if tail and outcome.reason != "cancelled":
                emit(tail)
            outcome.completion_tokens = n
        finally:
            emit(_END)


def _common_prefix(llm: Any, tokens: list[int]) -> int:
    """Prompt tokens already in this instance's KV cache (llama.cpp reuses them)."""
    cached = llm.input_ids[: llm.n_tokens]
    n = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        n += 1
    return min(n, max(len(tokens) - 1, 0))
