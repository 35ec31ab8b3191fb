"""Faster runtimes for the sentence-transformers model: same weights, same tokenizer, same pooling, less CPU.

sentence-transformers loads the model (tokenizer, pooling configuration, max sequence length); its transformer
then runs in one of two compiled forms, both from one cached ONNX export, and mean pooling and L2 normalisation
are done here exactly as the model's Pooling and Normalize modules do:

- `OnnxEncoder` (fp32): the transformer exported once with `torch.onnx` to a file cached by content hash, run by
  ONNX Runtime. Vectors equal the PyTorch path's to ~1e-7. Why: PyTorch's per-layer Python overhead made one
  short sentence cost ~10 ms on 2 cores and held the GIL against the event loop; ONNX Runtime runs the whole graph
  in C++ with the GIL released. (sentence-transformers' own `backend="onnx"` needs optimum-onnx, which pins
  transformers < 4.58 while sentence-transformers 6 needs transformers 5: it cannot be installed beside it.)
- `OpenVinoEncoder` (bf16): the same ONNX file compiled by OpenVINO with a bfloat16 inference precision, so the
  matrix products run on the CPU's bfloat16 units (AMX tiles, or AVX-512 BF16) while layer norms, softmax and
  pooling stay fp32. One thread, short texts, on an Intel CPU with AMX (interleaved runs, median CPU ms per
  text): 1.54 in batches of 10-40 and 5.5 alone, against 5.3 / 9.0 for ONNX Runtime fp32 and 2.3 / 7.7 for the
  model traced by TorchScript under bfloat16 autocast (this module's bf16 path before). On an AMD EPYC (Zen 5,
  AVX-512 BF16, no AMX), same run: 1.33 in batches of 32 and 2.0 alone, against 2.21 / 3.2 for ONNX Runtime fp32.
  Vectors stay within cosine 0.9999 of fp32 (tests/memory/test_embedding_runtimes.py). Without native bfloat16,
  OpenVINO emulates it, slower, so `precision="auto"` only picks it where `native_bf16()` says so.

Only models shaped Transformer -> mean Pooling [-> Normalize] are compiled (all-MiniLM-L6-v2 and most sentence
models); `supported()` says why another is not, and the caller falls back to plain PyTorch fp32.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from parley.runtime.logging import get_logger

_log = get_logger(__name__)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Two texts of different lengths: the traced graph then takes the attention-mask path that padded batches need.
_SAMPLE = ["export sample", "a longer export sample, so that the batch is padded"]


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively, so that bf16 is worth choosing: Intel's AMX tiles or the
    AVX-512 BF16 dot products (Intel Cooper Lake and later, AMD Zen 4 and later), as OpenVINO's CPU plugin reports
    it (`BF16` among the device's optimization capabilities, the check its documentation gives). Elsewhere
    OpenVINO would emulate bfloat16, slower than fp32."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no OpenVINO, or no CPU plugin: then no bf16 either
        return False


def _mean_pool_normalize(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The model's mean Pooling (over real tokens) and Normalize modules."""
    mask = attention_mask[..., None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    return (pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)


def _last_hidden_state_module(model, names: list[str]):
    """The model's transformer as a module of positional tensors returning the last hidden state."""
    import torch

    transformer = model[0].auto_model.eval()

    class _LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *inputs):
            return self.transformer(**dict(zip(names, inputs, strict=True))).last_hidden_state

    return _LastHiddenState().eval()


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
    """A hash of the model's content: every file's path (relative to the model's folder) and bytes.

    Not of sizes and modification times: every fresh install of the same model (a new virtualenv, a new
    clone, a container layer) gets new times, so each made its own ~90 MB export, and the cache grew by one
    per install. Reading ~92 MB to hash it takes ~0.2 s, in the loading thread.
    """
    digest = hashlib.sha256()
    root = Path(model_path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:24]


def _export(model, target: Path) -> None:
    import torch

    sample = model.tokenizer(_SAMPLE, padding=True, return_tensors="pt")
    names = [n for n in _INPUTS if n in sample]
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings are about control flow we do not use
        torch.onnx.export(
            _last_hidden_state_module(model, names), tuple(sample[n] for n in names), str(tmp), input_names=names,
            output_names=["last_hidden_state"], opset_version=17, dynamo=False,
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
        )
    tmp.replace(target)  # atomic: a concurrent loader sees the old state or the whole file


def _exported(model, model_path: str, cache_dir: Path) -> Path:
    """The transformer's ONNX export, made once per model content (`_fingerprint`) and reused."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{Path(model_path).name}-{_fingerprint(model_path)}.onnx"
    if not target.exists():
        _log.info("embedding_onnx_exporting", target=str(target))
        _export(model, target)
    return target


class _Encoder:
    """What the compiled encoders share. Not thread-safe: one thread per instance (see `clone`)."""

    _tokenizer = None

    def clone(self):
        """The same compiled model with a tokenizer of its own, for a second encode thread (the model itself
        may run in several threads at once; a fast tokenizer may not)."""
        twin = copy.copy(self)
        twin._tokenizer = copy.deepcopy(self._tokenizer)
        return twin


class OnnxEncoder(_Encoder):
    """Encodes texts to unit-length fp32 vectors with ONNX Runtime."""

    precision = "fp32"
    max_batch = 64  # texts per run: throughput is flat from 16 to 64 here

    def __init__(self, session, tokenizer, max_seq_length: int) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._max_seq_length = max_seq_length
        self._names = [i.name for i in session.get_inputs()]

    @classmethod
    def build(cls, model, model_path: str, cache_dir: Path, threads: int) -> OnnxEncoder:
        import onnxruntime as ort

        target = _exported(model, model_path, cache_dir)
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
        return _mean_pool_normalize(hidden, batch["attention_mask"])


class OpenVinoEncoder(_Encoder):
    """Encodes texts with the transformer's matrix products in bfloat16, by OpenVINO from the ONNX export."""

    precision = "bf16"
    max_batch = 32  # texts per run (1.3 ms per text at 32, 1.75 at 16 here)
    PAD_TOKENS = 8

    def __init__(self, core, graph, config: dict, tokenizer, max_seq_length: int) -> None:
        self._core, self._graph, self._config = core, graph, config
        self._tokenizer = tokenizer
        self._max_seq_length = max_seq_length
        self._names = [i.get_any_name() for i in graph.inputs]
        self._compile()

    def _compile(self) -> None:
        # One compiled model runs one request at a time: each encode thread compiles its own (~0.3 s).
        self._request = self._core.compile_model(self._graph, "CPU", self._config).create_infer_request()

    @classmethod
    def build(cls, model, model_path: str, cache_dir: Path, threads: int) -> OpenVinoEncoder:
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": "bf16",  # matrix products on the AMX tiles; norms and softmax stay fp32
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads,  # 0: OpenVINO's default (all cores)
            "ENABLE_CPU_PINNING": False,  # the event loop and the database share these cores
        }
        graph = core.read_model(str(_exported(model, model_path, cache_dir)))
        encoder = cls(core, graph, config, model.tokenizer, int(model.max_seq_length))
        encoder.encode(_SAMPLE)  # the first run prepares the kernels: do it now, not in a request
        return encoder

    def clone(self):
        twin = super().clone()
        twin._compile()
        return twin

    def encode(self, texts: list[str]) -> np.ndarray:
        # Padded to a multiple of PAD_TOKENS: each new input shape costs the compiled model ~1 ms of set-up, so
        # few shapes beat exact lengths (one text of 5-40 tokens: 2.4 against 3.0 ms CPU here; batches of 4:
        # 1.4 against 2.0 ms per text). Multiples of 8 rather than 16: short messages (14-25 tokens) were padded
        # to 32, and the background lane's CPU per text fell 8-24% in three interleaved ingestion runs, with one
        # text alone unchanged (3.4-4.3 ms warm either way, same run). Padding is masked: the vectors agree to
        # cosine 0.9999999.
        batch = self._tokenizer(texts, padding=True, pad_to_multiple_of=self.PAD_TOKENS, truncation=True,
                                max_length=self._max_seq_length, return_tensors="np")
        self._request.infer({n: batch[n].astype(np.int64) for n in self._names}, share_inputs=True)
        hidden = self._request.get_output_tensor(0).data  # the request's buffer: pooled into a new array below
        return _mean_pool_normalize(hidden, batch["attention_mask"])
