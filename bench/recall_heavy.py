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
from pathlib import Path

from bench.common import summary_ms
from bench.memory_bench import bench_embedder, bench_recall, bulk_load, corpus, embed_cached, questions
from parley.runtime.db import Database, migrate
from parley.runtime.embedded import embedded_postgres
from parley.runtime.logging import configure_logging
from services.memory.store import HNSW_EF_SEARCH, MemoryStore

MESSAGES = 100_000


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
    asked = [heavy[i % len(heavy)] for i in range(args.queries)]
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
                        store.exact_recall_max_messages = args.per_user if exact else 0
                        r = await bench_recall(store, db, vectors, owner, asked, qvecs, owned=args.per_user)
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
