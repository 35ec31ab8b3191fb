"""A message is never lost because embedding failed: it is stored first, embedded later by the backfill."""

from __future__ import annotations

import asyncio

import pytest

from parley.runtime.config import MemorySettings
from parley.runtime.db import Database, migrate
from parley.runtime.embeddings import Embedder
from services.memory.core import EmbeddingBackfill, MemoryCore
from services.memory.records import NewMessage, RecallQuery, Role
from services.memory.store import MemoryStore


@pytest.fixture(scope="module")
async def parts(database_url):
    await migrate(database_url)
    db = Database(database_url)
    embedder = await Embedder.load(None, batch_size=64, max_wait_ms=2)
    embedder.start()
    store = MemoryStore(db.engine)
    yield MemoryCore(store, embedder, MemorySettings()), store, embedder
    await embedder.close()
    await db.close()


async def test_failed_embedding_is_stored_then_backfilled(parts, monkeypatch):
    core, store, embedder = parts
    conv = await core.create_conversation("backfill-user", "", {})

    def broken(texts, encoder):
        raise RuntimeError("embedding model crashed")

    monkeypatch.setattr(embedder, "_encode", broken)  # fault injection into the real embedder
    stored, _ = await core.append_messages("backfill-user", str(conv.id), [
        NewMessage(Role.USER, "My favourite colour is ultramarine."),
        NewMessage(Role.ASSISTANT, "Ultramarine is a deep blue."),
    ])
    assert [m.embedded for m in stored] == [False, False], "stored even though embedding failed"
    listed, _ = await core.list_messages("backfill-user", str(conv.id), 10, "", 0)
    assert [m.content for m in listed] == ["My favourite colour is ultramarine.", "Ultramarine is a deep blue."]

    monkeypatch.undo()
    await EmbeddingBackfill(store, embedder).run_once()  # default grace: too young, their vectors may be in flight
    listed, _ = await core.list_messages("backfill-user", str(conv.id), 10, "", 0)
    assert [m.embedded for m in listed] == [False, False], "a sweep leaves messages younger than min_age_s alone"
    filled = await EmbeddingBackfill(store, embedder, min_age_s=0).run_once()
    assert filled >= 2
    hits = await core.recall("what colour do I like?", RecallQuery(
        user_id="backfill-user", vector=[], top_k=3, min_score=0.0, conversation_ids=[], roles=[], start_time=None,
        end_time=None, exclude_ids=[], exclude_recent_conversation=None, exclude_recent_count=0))
    assert hits and "ultramarine" in hits[0][0].content.lower()


async def test_concurrent_requests_share_forward_passes(parts):
    _, _, embedder = parts
    before = embedder.batches
    results = await asyncio.gather(*(embedder.embed([f"sentence {i}"]) for i in range(32)))
    assert all(r.shape == (1, 384) for r in results)
    assert embedder.batches - before < 32 / 2, "32 concurrent requests were micro-batched"


async def test_repeated_texts_cost_one_forward_pass(parts):
    _, _, embedder = parts
    first = await embedder.embed(["a sentence embedded twice", "another one"])
    before = embedder.batches
    again = await embedder.embed(["another one", "a sentence embedded twice", "another one"])
    assert embedder.batches == before, "served from the cache"
    assert (again[1] == first[0]).all() and (again[0] == first[1]).all() and again.shape == (3, 384)


async def test_concurrent_appends_and_chunking_all_embed(parts):
    """Token counting, chunking and encoding run in different threads: none may corrupt another's tokenizer."""
    core, _, _ = parts
    conv = await core.create_conversation("concurrent-user", "", {})
    appends = [core.append_messages("concurrent-user", str(conv.id), [NewMessage(Role.USER, f"note {i}: " + "word " * i)])
               for i in range(32)]
    docs = [core.ingest_document("concurrent-user", f"doc {i}", "", "A paragraph of text. " * 200, 1, {}, 32, 4)
            for i in range(3)]
    results = await asyncio.gather(*appends, *docs)
    assert all(m.embedded for batch, _ in results[:32] for m in batch), "every message got its embedding"
    assert all(d.chunk_count > 10 for d in results[32:])


async def test_token_counting_during_encoding_does_not_corrupt_batches(parts):
    """The encode thread pads and truncates with its tokenizer while other threads count tokens."""
    import threading

    _, _, embedder = parts
    stop = threading.Event()

    def count_forever():
        while not stop.is_set():
            embedder.count_tokens(["short", "a much longer sentence " * 30])

    counter = threading.Thread(target=count_forever)
    counter.start()
    try:
        for round_ in range(6):
            texts = [f"round {round_} text {i} " + "filler " * (i * 7 % 60) for i in range(48)]
            vectors = await embedder.embed(texts)
            assert vectors.shape == (48, 384)
    finally:
        stop.set()
        counter.join()


async def test_recall_through_the_hnsw_path_matches_the_exact_path(parts):
    """Above `exact_recall_max_messages` the HNSW index answers: same user scoping, same best hit here."""
    core, store, embedder = parts
    conv = await core.create_conversation("hnsw-user", "", {})
    await core.append_messages("hnsw-user", str(conv.id), [
        NewMessage(Role.USER, "The wifi password is written under the router."),
        NewMessage(Role.USER, "I am allergic to peanuts."),
        NewMessage(Role.USER, "My sister lives in Porto."),
    ])
    query = RecallQuery(user_id="hnsw-user", vector=(await embedder.embed(["what am I allergic to?"]))[0].tolist(),
                        top_k=2, min_score=0.0, conversation_ids=[], roles=[Role.USER], start_time=None,
                        end_time=None, exclude_ids=[], exclude_recent_conversation=None, exclude_recent_count=0)
    exact = await store.recall(query)
    approximate = await MemoryStore(store.engine, exact_recall_max_messages=0).recall(query)
    assert [m.content for m, _ in exact][0] == "I am allergic to peanuts."
    assert [m.id for m, _ in approximate] == [m.id for m, _ in exact]
    assert all(m.user_id == "hnsw-user" for m, _ in approximate)


@pytest.fixture
async def lanes(parts):
    """A second embedder over the same loaded model, with a background lane that waits long to fill up."""
    _, _, loaded = parts
    embedder = Embedder(loaded._model, batch_size=64, max_wait_ms=2, encoder=loaded._encoder,
                        background_wait_ms=10_000, background_batch=4)
    encoded: list[list[str]] = []
    real = embedder._encode

    def recording(texts, encoder):  # the real forward pass, with a record of what it was given
        encoded.append(list(texts))
        return real(texts, encoder)

    embedder._encode = recording
    embedder.start()
    yield embedder, encoded
    await embedder.close()


async def test_background_texts_wait_to_fill_a_batch(lanes):
    embedder, encoded = lanes
    first = [asyncio.ensure_future(embedder.embed([f"background note {i}"], background=True)) for i in range(3)]
    await asyncio.sleep(0.3)
    assert not any(f.done() for f in first) and encoded == [], "3 texts wait for a 4th (or 10 s)"
    last = await asyncio.wait_for(embedder.embed(["background note 3"], background=True), 5)
    vectors = await asyncio.wait_for(asyncio.gather(*first), 5)
    assert encoded == [[f"background note {i}" for i in range(4)]], "one forward pass for the four"
    assert all(v.shape == (1, 384) for v in [*vectors, last])


async def test_urgent_texts_do_not_wait_for_background_batches(lanes):
    embedder, encoded = lanes
    queued = asyncio.ensure_future(embedder.embed(["shared text"], background=True))
    await asyncio.sleep(0.05)
    urgent = await asyncio.wait_for(embedder.embed(["shared text"]), 5)  # does not wait for the background pass
    assert not queued.done() and encoded == [["shared text"]]
    await asyncio.wait_for(embedder.embed(["a", "b", "c"], background=True), 5)  # fills the background batch
    assert (await asyncio.wait_for(queued, 5) == urgent).all()
    assert encoded == [["shared text"], ["a", "b", "c"]], "the background pass skipped what the urgent one computed"


async def test_a_waited_background_request_does_not_wait_for_the_batch_to_fill(lanes):
    """A document's chunks (the IngestDocument caller waits) take the background lane, so they never go ahead
    of a recall query, but their pass starts with what is queued instead of waiting for `background_batch` texts
    (10 s in this fixture)."""
    embedder, encoded = lanes
    queued = asyncio.ensure_future(embedder.embed(["an earlier background note"], background=True))
    await asyncio.sleep(0.05)
    assert encoded == [], "1 of 4 texts: the background lane waits"
    chunks = await asyncio.wait_for(embedder.embed(["chunk one", "chunk two"], background=True, waited=True), 5)
    assert chunks.shape == (2, 384)
    await asyncio.wait_for(queued, 5)
    assert encoded == [["an earlier background note", "chunk one", "chunk two"]], "one pass, started at once"


async def test_a_waited_request_for_texts_already_queued_wakes_their_pass(lanes):
    """The same text queued by an append (not waited) and then in a document: the document's caller waits on
    that pass, which is told to start instead of waiting for the batch to fill (10 s here)."""
    embedder, encoded = lanes
    queued = asyncio.ensure_future(embedder.embed(["a note pasted twice"], background=True))
    await asyncio.sleep(0.05)
    assert encoded == []
    again = await asyncio.wait_for(embedder.embed(["a note pasted twice"], background=True, waited=True), 5)
    assert (await asyncio.wait_for(queued, 5) == again).all()
    assert encoded == [["a note pasted twice"]], "one pass for both callers"
