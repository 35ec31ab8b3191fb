"""The sentence-transformers model run by ONNX Runtime: same weights, same tokenizer, same pooling, less CPU.

sentence-transformers loads the model (tokenizer, pooling configuration, max sequence length); its transformer
is exported once with `torch.onnx` to a file cached by content hash, and ONNX Runtime runs it. Mean pooling and
L2 normalisation are done here exactly as the model's Pooling and Normalize modules do, so the vectors equal the
torch path's to ~1e-7 (tests/test_embeddings.py checks it). Why: on a 2-core machine PyTorch's per-layer Python
overhead made one short sentence cost ~10 ms and held the GIL against the event loop; ONNX Runtime runs the whole
graph in C++ with the GIL released. (sentence-transformers' own `backend="onnx"` needs optimum-onnx, which pins
transformers < 4.58 while sentence-transformers 6 needs transformers 5: it cannot be installed beside it.)

Only models shaped Transformer -> mean Pooling [-> Normalize] are exported (all-MiniLM-L6-v2 and most sentence
models); `supported()` says why another is not, and the caller falls back to torch.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from parley.runtime.logging import get_logger

_log = get_logger(__name__)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parley" / "onnx"


def supported(model) -> str | None:
    """None when `model` (a SentenceTransformer) can run here; otherwise why not."""
    from sentence_transformers.models import Normalize, Pooling, Transformer

    modules = list(model)
    if not modules or not isinstance(modules[0], Transformer):
        return "the first module is not a Transformer"
    if len(modules) < 2 or not isinstance(modules[1], Pooling):
        return "no Pooling module after the Transformer"
    if modules[1].pooling_mode != "mean" or getattr(modules[1], "include_prompt", True) is not True:
        return f"pooling is {modules[1].pooling_mode!r}, only plain 'mean' is exported"
    if any(not isinstance(m, Normalize) for m in modules[2:]):
        return "modules after Pooling other than Normalize"
    return None


def _fingerprint(model_path: str) -> str:
    """Changes when the weights or the configuration change (name, size and mtime of every file)."""
    digest = hashlib.sha256()
    root = Path(model_path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:24]


def _export(model, target: Path) -> None:
    import torch

    transformer = model[0].auto_model.eval()
    sample = model.tokenizer(["export sample"], return_tensors="pt")
    names = [n for n in _INPUTS if n in sample]

    class _LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *inputs):
            return self.transformer(**dict(zip(names, inputs, strict=True))).last_hidden_state

    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings are about control flow we do not use
        torch.onnx.export(
            _LastHiddenState(), tuple(sample[n] for n in names), str(tmp), input_names=names,
            output_names=["last_hidden_state"], opset_version=17, dynamo=False,
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
        )
    tmp.replace(target)  # atomic: a concurrent loader sees the old state or the whole file


class OnnxEncoder:
    """Encodes texts to unit-length vectors with ONNX Runtime. Not thread-safe (one encode thread uses it)."""

    def __init__(self, session, tokenizer, max_seq_length: int) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._max_seq_length = max_seq_length
        self._names = [i.name for i in session.get_inputs()]

    @classmethod
    def build(cls, model, model_path: str, cache_dir: Path, threads: int) -> OnnxEncoder:
        import onnxruntime as ort

        cache_dir.mkdir(parents=True, exist_ok=True)
        target = cache_dir / f"{Path(model_path).name}-{_fingerprint(model_path)}.onnx"
        if not target.exists():
            _log.info("embedding_onnx_exporting", target=str(target))
            _export(model, target)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (all cores)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        return cls(session, model.tokenizer, int(model.max_seq_length))

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_seq_length,
                                return_tensors="np")
        hidden = self._session.run(None, {n: batch[n].astype(np.int64) for n in self._names})[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        return (pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)
