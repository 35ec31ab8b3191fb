"""VectorWriter: vectors nobody waits for are written later and together; a write someone waits for goes out at
once, with whatever is queued (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest
from sqlalchemy import text

from services.memory.core import VectorWriter
from services.memory.records import NewMessage, Role
from services.memory.store import MemoryStore


class CountingStore:
    """The real store, counting its UPDATEs of vectors."""

    def __init__(self, store: MemoryStore) -> None:
        self.store, self.updates = store, 0

    async def set_embeddings(self, ids, vectors) -> None:
        self.updates += 1
        await self.store.set_embeddings(ids, vectors)


async def _messages(store: MemoryStore, n: int) -> list[uuid.UUID]:
    """`n` stored messages without vectors."""
    user = f"writer-{uuid.uuid4().hex[:8]}"
    conv = await store.create_conversation(user, "", {})
    ids = [uuid.uuid4() for _ in range(n)]
    await store.append_messages(user, conv.id, [NewMessage(Role.USER, f"note {i}") for i in range(n)], [2] * n, ids)
    return ids


async def _embedded(store: MemoryStore, ids: list[uuid.UUID]) -> list[bool]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(text("SELECT id, embedding IS NOT NULL AS done FROM messages "
                                       "WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids})
        done = {r.id: r.done for r in rows}
    return [done[i] for i in ids]


def _vector() -> np.ndarray:
    v = np.random.default_rng().standard_normal((1, 384)).astype(np.float32)
    return v / np.linalg.norm(v)


async def test_vectors_nobody_waits_for_wait_then_go_out_in_one_update(store):
    ids = await _messages(store, 3)
    counting = CountingStore(store)
    writer = VectorWriter(counting, delay_s=0.5)
    started = time.monotonic()
    writes = [asyncio.ensure_future(writer.write([i], _vector(), urgent=False)) for i in ids]
    await asyncio.sleep(0.2)
    assert await _embedded(store, ids) == [False] * 3 and counting.updates == 0, "still waiting for others"
    await asyncio.wait_for(asyncio.gather(*writes), 10)
    assert time.monotonic() - started >= 0.45
    assert await _embedded(store, ids) == [True] * 3
    assert counting.updates == 1, "the three writes shared one UPDATE"


async def test_a_write_someone_waits_for_goes_out_at_once_with_the_queued_ones(store):
    ids = await _messages(store, 3)
    counting = CountingStore(store)
    writer = VectorWriter(counting, delay_s=30)
    later = [asyncio.ensure_future(writer.write([i], _vector(), urgent=False)) for i in ids[:2]]
    await asyncio.sleep(0.05)
    await asyncio.wait_for(writer.write([ids[2]], _vector()), 10)  # urgent: not 30 s
    await asyncio.wait_for(asyncio.gather(*later), 10)
    assert await _embedded(store, ids) == [True] * 3 and counting.updates == 1


async def test_flush_now_writes_what_is_queued(store):
    ids = await _messages(store, 2)
    writer = VectorWriter(store, delay_s=30)
    queued = asyncio.ensure_future(writer.write(ids, np.concatenate([_vector(), _vector()]), urgent=False))
    await asyncio.sleep(0.05)
    writer.flush_now()  # what MemoryCore.close does at shutdown
    await asyncio.wait_for(queued, 10)
    assert await _embedded(store, ids) == [True, True]


async def test_a_failed_update_fails_its_writers_and_the_writer_goes_on(store):
    ids = await _messages(store, 1)
    writer = VectorWriter(store, delay_s=0.01)
    with pytest.raises(Exception):  # noqa: B017 - whatever the database says about a 3-d vector
        await asyncio.wait_for(writer.write(ids, np.ones((1, 3), dtype=np.float32), urgent=False), 10)
    await asyncio.wait_for(writer.write(ids, _vector(), urgent=False), 10)
    assert await _embedded(store, ids) == [True]
