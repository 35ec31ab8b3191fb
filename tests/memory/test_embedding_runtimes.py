"""The embedding runtimes give the same vectors (ONNX Runtime and PyTorch exactly, OpenVINO bfloat16 within cosine
0.9995); vectors are written in coalesced statements, exactly; the exact recall plan reads the covering index,
never HNSW."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from parley.runtime.config import MemorySettings
from parley.runtime.db import Database, migrate
from parley.runtime import encoders
from parley.runtime.embeddings import Embedder, packaged_embedding_model_path
from services.memory.core import MemoryCore
from services.memory.records import NewMessage, RecallQuery, Role
from services.memory.store import MemoryStore

TEXTS = [
    "My favourite food is spicy ramen.",
    "hi",
    "Where do I live? " * 200,  # longer than the model's 256 tokens: truncated the same way by both runtimes
    "Ünïcödé, emoji 🙂 and numbers 12345.",
    "I moved to Lisbon last spring and I have a grey cat.",
]


@pytest.fixture(scope="module")
async def runtimes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("onnx-cache")
    onnx = await Embedder.load(None, batch_size=2, max_wait_ms=1, backend="onnx", onnx_cache_dir=cache,
                               precision="fp32")
    torch_ = Embedder(onnx._model, batch_size=2, max_wait_ms=1)  # the very same weights, run by PyTorch
    for e in (onnx, torch_):
        e.start()
    yield onnx, torch_, cache
    for e in (onnx, torch_):
        await e.close()


async def test_onnx_runtime_gives_the_torch_vectors(runtimes):
    onnx, torch_, _ = runtimes
    assert (onnx.backend, torch_.backend) == ("onnx", "torch")
    a, b = await onnx.embed(TEXTS), await torch_.embed(TEXTS)  # batches of 2, sorted by length: padding varies
    assert a.shape == b.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - b).max() < 1e-5, "same model, same pooling, same normalisation"
    assert (a @ a[0]).argmax() == 0 and (a[4] @ a[0]) < 0.9  # and they are real, distinct vectors


async def test_the_export_is_cached_and_reused(runtimes):
    _, _, cache = runtimes
    exported = list(cache.glob("*.onnx"))
    assert len(exported) == 1 and exported[0].stat().st_size > 10_000_000
    mtime = exported[0].stat().st_mtime_ns
    again = await Embedder.load(None, batch_size=8, max_wait_ms=1, backend="onnx", onnx_cache_dir=cache,
                                precision="fp32")
    assert again.backend == "onnx"
    assert list(cache.glob("*.onnx")) == exported and exported[0].stat().st_mtime_ns == mtime, "not exported again"


async def test_another_install_of_the_same_model_reuses_the_export(runtimes, tmp_path):
    """A fresh install (another folder, new file times) of the same files is the same model: no second export."""
    _, _, cache = runtimes
    exported = list(cache.glob("*.onnx"))
    elsewhere = tmp_path / "site-packages" / "model"
    shutil.copytree(packaged_embedding_model_path(), elsewhere, copy_function=shutil.copy)  # new mtimes
    assert (elsewhere / "config.json").stat().st_mtime_ns != \
        (Path(packaged_embedding_model_path()) / "config.json").stat().st_mtime_ns
    other = await Embedder.load(str(elsewhere), batch_size=8, max_wait_ms=1, backend="onnx", onnx_cache_dir=cache,
                                precision="fp32")
    assert other.backend == "onnx"
    assert list(cache.glob("*.onnx")) == exported, "the same content must map to the same export"


def test_the_export_key_follows_the_content(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"\x01" * 1000)
    (model / "sub" / "config.json").write_text('{"a": 1}')
    key = encoders._fingerprint(str(model))
    (model / "weights.bin").write_bytes(b"\x01" * 999 + b"\x02")  # same size, one byte changed
    assert encoders._fingerprint(str(model)) != key
    (model / "weights.bin").write_bytes(b"\x01" * 1000)
    assert encoders._fingerprint(str(model)) == key
    (model / "sub" / "config.json").rename(model / "config.json")  # same bytes under another name
    assert encoders._fingerprint(str(model)) != key


async def test_a_model_onnx_cannot_take_falls_back_to_torch(tmp_path):
    model = tmp_path / "cls-pooled"
    shutil.copytree(packaged_embedding_model_path(), model)
    pooling = model / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config = {k: v for k, v in config.items() if not k.startswith("pooling_mode")} | {"pooling_mode": "cls"}
    pooling.write_text(json.dumps(config))
    for precision in ("fp32", "bf16"):
        embedder = await Embedder.load(str(model), batch_size=8, max_wait_ms=1, backend="onnx",
                                       onnx_cache_dir=tmp_path / "cache", precision=precision)
        assert (embedder.backend, embedder.precision) == ("torch", "fp32")
    assert not list(tmp_path.rglob("*.onnx")), "nothing exported"


async def test_an_unwritable_cache_falls_back_to_torch(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    embedder = await Embedder.load(None, batch_size=8, max_wait_ms=1, backend="onnx", onnx_cache_dir=blocked / "x",
                                   precision="fp32")
    assert embedder.backend == "torch"
    embedder.start()
    try:
        assert (await embedder.embed(["still embedded"])).shape == (1, 384)
    finally:
        await embedder.close()


async def test_bfloat16_vectors_stay_within_cosine_0_9995_of_fp32(runtimes):
    onnx, _, cache = runtimes
    encoder = await asyncio.to_thread(encoders.OpenVinoEncoder.build, onnx._model, packaged_embedding_model_path(),
                                      cache, 1)
    bf16 = Embedder(onnx._model, batch_size=2, max_wait_ms=1, encoder=encoder)
    bf16.start()
    try:
        assert (bf16.backend, bf16.precision) == ("openvino", "bf16")
        reference, batched = await onnx.embed(TEXTS), await bf16.embed(TEXTS)  # pairs sorted by length: padded
        alone = [bf16._encode([t], bf16._encoder)[0] for t in TEXTS]  # one at a time: other shapes, other kernels
        # The background lane runs its own compiled copy (one compiled model runs one request at a time).
        background = await bf16.embed([f"{t} (later)" for t in TEXTS], background=True)
        later = await onnx.embed([f"{t} (later)" for t in TEXTS])
    finally:
        await bf16.close()
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert (batched * reference).sum(axis=1).min() > 0.9995, "the model's vectors, to bfloat16 rounding"
    assert (np.stack(alone) * batched).sum(axis=1).min() > 0.9995, "batching changes rounding, not meaning"
    assert (background * later).sum(axis=1).min() > 0.9995, "the background lane's copy gives the same vectors"
    scores, expected = batched @ batched[0], reference @ reference[0]
    assert list(np.argsort(-scores)) == list(np.argsort(-expected)), "same ranking of these texts"


async def test_auto_precision_is_bf16_only_with_native_bfloat16(tmp_path):
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if flags:  # Linux: OpenVINO's answer agrees with the CPU's own flags
        assert encoders.native_bf16() == bool({"amx_bf16", "avx512_bf16"} & flags)
    embedder = await Embedder.load(None, batch_size=8, max_wait_ms=1, onnx_cache_dir=tmp_path, precision="auto")
    assert embedder.precision == ("bf16" if encoders.native_bf16() else "fp32")
    assert embedder.backend == ("openvino" if encoders.native_bf16() else "onnx")


@pytest.fixture(scope="module")
async def core(database_url, runtimes):
    await migrate(database_url)
    db = Database(database_url)
    store = MemoryStore(db.engine)
    yield MemoryCore(store, runtimes[0], MemorySettings()), store
    await db.close()


async def test_concurrent_turns_share_vector_writes(core, monkeypatch):
    memory, store = core
    statements = []
    real = store.set_embeddings

    async def counted(ids, vectors):
        statements.append(len(ids))
        await asyncio.sleep(0.02)  # a slow database: writes queue up behind this one
        await real(ids, vectors)

    monkeypatch.setattr(store, "set_embeddings", counted)
    conv = await memory.create_conversation("writer-user", "", {})
    batches = await asyncio.gather(*(
        memory.append_messages("writer-user", str(conv.id), [NewMessage(Role.USER, f"fact number {i} about me")])
        for i in range(24)))
    assert all(m.embedded for batch, _ in batches for m in batch)
    assert sum(statements) == 24 and len(statements) < 12, f"coalesced, got {statements}"
    async with store.engine.connect() as conn:
        missing = (await conn.execute(text(
            "SELECT count(*) FROM messages WHERE user_id = 'writer-user' AND embedding IS NULL"))).scalar_one()
        stored = (await conn.execute(text(
            "SELECT content, embedding::text FROM messages WHERE user_id = 'writer-user'"))).all()
    assert missing == 0
    expected = await memory.embedder.embed([content for content, _ in stored])
    # Each message got its own vector (sliced from one binary array), bit for bit as float4.
    assert np.array_equal(np.array([json.loads(v) for _, v in stored], dtype=np.float32), expected)


async def test_exact_recall_reads_the_covering_index_not_hnsw(core):
    memory, store = core
    conv = await memory.create_conversation("plan-user", "", {})
    await memory.append_messages("plan-user", str(conv.id), [NewMessage(Role.USER, f"plan note {i}") for i in range(5)])
    query = RecallQuery(user_id="plan-user", vector=[0.05] * 384, top_k=3, min_score=0.0, conversation_ids=[],
                        roles=[Role.USER], start_time=None, end_time=None, exclude_ids=[],
                        exclude_recent_conversation=None, exclude_recent_count=0)
    exact, _, params = store.recall_statements(query)
    async with store.engine.connect() as conn:
        await conn.execute(text("SET LOCAL enable_seqscan = off"))  # a tiny test table would be scanned whole
        await conn.execute(text("SET LOCAL enable_bitmapscan = off"))
        plan = json.dumps((await conn.execute(text(f"EXPLAIN (FORMAT JSON) {exact.text}"), params)).scalar_one())
    assert "messages_user_recall_half" in plan and "Index Only Scan" in plan
    assert "messages_embedding_hnsw" not in plan
    hits = await store.recall(query)
    assert len(hits) == 3 and all(m.user_id == "plan-user" for m, _ in hits)
