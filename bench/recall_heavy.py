"""Recall for heavy users: the exact plan against the HNSW plan for users with tens of thousands of messages.

`PARLEY_MEMORY__EXACT_RECALL_MAX_MESSAGES` chooses between the two plans of `MemoryStore.recall` by the user's
message count. This prints, for users of `--per-user` messages each (the rest of the 100k-message corpus goes to
100 light users), both plans' latency (SQL, query vector given) and recall@10 against an exact scan in numpy over
the same vectors (the baseline), with the plan PostgreSQL chose. Not a test: it prints figures.

    .venv/bin/python -m bench.recall_heavy                       # two users of 40,000 messages
    .venv/bin/python -m bench.recall_heavy --heavy 1 --per-user 80000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

from bench.common import summary_ms
from bench.memory_bench import bench_embedder, bulk_load, corpus, embed_cached, questions
from parley.runtime.db import Database, migrate
from parley.runtime.embedded import embedded_postgres
from parley.runtime.logging import configure_logging
from services.memory.records import RecallQuery, Role
from services.memory.store import HNSW_EF_SEARCH, MemoryStore

MESSAGES = 100_000


async def measure(store: MemoryStore, db: Database, users: list[str], qvecs: np.ndarray, vectors: np.ndarray,
                  owner: np.ndarray, owned: int, exact: bool) -> dict[str, object]:
    store.exact_recall_max_messages = owned if exact else 0
    latencies, recalls, statement, params = [], [], None, None
    for i, q in enumerate(qvecs):
        user = users[i % len(users)]
        query = RecallQuery(user_id=user, vector=q.tolist(), top_k=10, min_score=0.0, conversation_ids=[],
                            roles=[Role.USER, Role.ASSISTANT], start_time=None, end_time=None, exclude_ids=[],
                            exclude_recent_conversation=None, exclude_recent_count=0)
        started = time.perf_counter()
        hits = await store.recall(query, owned=owned)
        latencies.append((time.perf_counter() - started) * 1000)
        idx = np.nonzero(owner == user)[0]
        kth = float(np.sort(vectors[idx] @ q)[-10])  # the exact 10th neighbour's similarity
        recalls.append(sum(1 for _, s in hits if s >= kth - 1e-4) / 10)  # ties count (as in memory_bench)
        statement, params = store.recall_statement(query, owned)
    async with db.engine.connect() as conn:
        plan = [r[0] for r in (await conn.execute(text("EXPLAIN " + statement.text), params)).all()]
    scans = sorted({line.strip().lstrip("-> ").split("  (")[0] for line in plan if " Scan " in line})
    return {"latency": latencies, "recall": float(np.mean(recalls)), "plan": "; ".join(scans)}


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging("WARNING", json=False)
    if args.heavy * args.per_user > MESSAGES:
        raise SystemExit(f"--heavy x --per-user must be at most {MESSAGES}")
    heavy = [f"heavy-{u}" for u in range(args.heavy)]
    owner = [u for u in heavy for _ in range(args.per_user)]
    owner += [f"light-{i % 100}" for i in range(MESSAGES - len(owner))]
    random.Random(5).shuffle(owner)  # interleaved in the table, as messages of concurrent users are
    embedder = await bench_embedder()
    texts = corpus(MESSAGES)
    vectors = await embed_cached(embedder, texts, "messages")
    qvecs = await embedder.embed(questions(args.queries, seed=3))
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        async with embedded_postgres(Path(tmp) / "pg") as url:
            await migrate(url)
            db = Database(url)
            try:
                await bulk_load(db, texts, vectors, owner)
                store = MemoryStore(db.engine, derived_engine=db.derived_engine)
                print(f"== recall for {args.heavy} user(s) of {args.per_user} messages each, in a table of {MESSAGES} "
                      f"(rest: 100 light users); {args.queries} queries; baseline: exact scan in numpy")
                for rnd in range(args.rounds):
                    for exact in (False, True):
                        r = await measure(store, db, heavy, qvecs, vectors, np.array(owner), args.per_user, exact)
                        label = ("exact plan (every row of the user ranked)" if exact else
                                 f"HNSW plan (ef_search={HNSW_EF_SEARCH}, relaxed_order)")
                        print(f"  round {rnd + 1}, {label}: {summary_ms(r['latency'])}; recall@10 {r['recall']:.3f}")
                        print(f"    plan: {r['plan']}")
            finally:
                await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy", type=int, default=2, help="heavy users")
    parser.add_argument("--per-user", type=int, default=40_000, help="messages of each heavy user")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
