"""Memory benchmark: ingestion, recall at 100k messages, history, hybrid document search, and a peer.

Runs against a real PostgreSQL+pgvector (embedded, in a temporary folder, unless
DATABASE_URL is set) and the real all-MiniLM-L6-v2 model, through the real gRPC service
where the number is about the service. Prints every figure; nothing here is a pass/fail test.

    .venv/bin/python -m bench.memory_bench                 # full run (~15 min on 2 cores; embeddings cached)
    .venv/bin/python -m bench.memory_bench --messages 20000 --chunks 2000   # quicker

Baselines named in the output: the goals of the memory issue (≥ 300 msgs/s ingestion, recall p95 ≤ 15 ms,
recall@10 ≥ 0.95), an exact scan (numpy over the same vectors) for recall@10, and LangChain's
`langchain-postgres` PGVector store on the same database with the same model for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from sqlalchemy import text

from bench.common import StealMeter, cpu_seconds, free_port, pct, process, summary_ms, table, wait_serving
from parley.memory.v1 import memory_pb2 as pb
from parley.memory.v1 import memory_pb2_grpc
from parley.runtime.app import running
from parley.runtime.clients import make_channel
from parley.runtime.config import Settings
from parley.runtime.db import Database, migrate
from parley.runtime.embedded import embedded_postgres
from parley.runtime.embeddings import Embedder
from parley.runtime.logging import configure_logging
from services.memory.store import HNSW_EF_SEARCH, MemoryStore, vectors_param

CACHE = Path.home() / ".cache" / "parley" / "bench"

NAMES = ["Ana", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Giulia", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
TOPICS = {
    "food": ["sushi", "lentil soup", "spicy ramen", "pistachio ice cream", "roast chicken", "mango salad"],
    "city": ["Lisbon", "Nairobi", "Osaka", "Porto Alegre", "Tallinn", "Montreal", "Hanoi", "Seville"],
    "hobby": ["bouldering", "playing the cello", "birdwatching", "sourdough baking", "chess", "trail running"],
    "pet": ["a grey cat", "two budgies", "a beagle", "a tortoise", "a rescue greyhound", "goldfish"],
    "work": ["a nurse", "a data engineer", "a carpenter", "a teacher", "an architect", "a pharmacist"],
    "trip": ["Iceland", "Patagonia", "Kyoto", "Morocco", "the Dolomites", "Vietnam"],
}
TEMPLATES = {
    "food": ["My favourite food is {x}.", "I had {x} for dinner again, I love it.", "Could you find a recipe for {x}?"],
    "city": ["I live in {x} now.", "I moved to {x} last spring.", "What is the weather usually like in {x}?"],
    "hobby": ["On weekends I go {x}.", "I've been {x} for three years.", "Any tips to get better at {x}?"],
    "pet": ["I have {x} at home.", "My pet is {x} and it keeps me busy.", "How do I care for {x} in summer?"],
    "work": ["I work as {x}.", "My job as {x} is stressful lately.", "Should I keep working as {x}?"],
    "trip": ["I'm planning a trip to {x}.", "We just came back from {x}.", "What should I pack for {x}?"],
}
QUESTIONS = {
    "food": "what food do I like?", "city": "where do I live?", "hobby": "what do I do for fun?",
    "pet": "what pet do I have?", "work": "what is my job?", "trip": "where am I travelling?",
}


FORMS = ["{name} here: {q}", "{q} ({name})", "remind me, {q} - {name}", "{name} asking again: {q}",
         "quick question from {name}: {q}", "{name}: sorry, {q} I forgot"]


def questions(n: int, seed: int) -> list[str]:
    """`n` distinct recall questions in random order: each Recall RPC embeds its query (the embedder keeps
    recent vectors, so a repeated text would cost nothing)."""
    rng = random.Random(seed)
    combos = [(form, q, name) for form in FORMS for q in QUESTIONS.values() for name in NAMES]
    rng.shuffle(combos)
    out = []
    for i in range(n):
        form, q, name = combos[i % len(combos)]
        out.append(form.format(name=name, q=q) + (f" (again, {i // len(combos)})" if i >= len(combos) else ""))
    return out


def corpus(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(list(TOPICS))
        sentence = rng.choice(TEMPLATES[topic]).format(x=rng.choice(TOPICS[topic]))
        out.append(f"{sentence} ({rng.choice(NAMES)}, note {i % 997})")
    return out


async def embed_cached(embedder: Embedder, texts: list[str], name: str) -> np.ndarray:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-{embedder.precision}-{len(texts)}.npy"  # bf16 and fp32 vectors differ (slightly)
    if path.exists():
        return np.load(path)
    started = time.perf_counter()
    vectors = np.concatenate([await embedder.embed(texts[i:i + 512]) for i in range(0, len(texts), 512)])
    print(f"  embedded {len(texts)} texts in {time.perf_counter() - started:.0f} s (cached at {path})")
    np.save(path, vectors)
    return vectors


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process (with its descendants), and of this one ("client")."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"client": usage.ru_utime + usage.ru_stime, **{name: cpu_seconds(pid) for name, pid in pids.items()}}


async def bench_ingestion(stub, db: Database, users: int, sequential: int, writers: int, per_writer: int,
                          async_embedding: bool, tag: str, seed: int,
                          pids: dict[str, int]) -> dict[str, float]:
    """Appends through gRPC, one message per call; the clock stops when the last embedding is stored.

    async_embedding=False: each AppendMessages returns once its vectors are stored.
    async_embedding=True: AppendMessages returns once the message is committed; the service embeds and stores the
    vectors right after (micro-batched across calls); the clock runs until none of these messages lacks a vector.
    """
    convs = {}
    for u in range(users):
        r = await stub.CreateConversation(pb.CreateConversationRequest(user_id=f"ingest-{tag}-{u}"))
        convs[u] = r.conversation.conversation_id
    texts = corpus(sequential + writers * per_writer, seed=seed)

    async def one(u: int, t: str) -> None:
        await stub.AppendMessages(pb.AppendMessagesRequest(
            user_id=f"ingest-{tag}-{u}", conversation_id=convs[u], async_embedding=async_embedding,
            messages=[pb.NewMessage(role=pb.ROLE_USER, content=t)]))

    async def all_embedded() -> None:
        while True:
            async with db.engine.connect() as conn:
                missing = (await conn.execute(text(
                    "SELECT count(*) FROM messages WHERE user_id LIKE :p AND embedding IS NULL"),
                    {"p": f"ingest-{tag}-%"})).scalar_one()
            if not missing:
                return
            await asyncio.sleep(0.005)

    async def measured(phase: str, appends: Callable[[], Awaitable], n: int) -> dict[str, float]:
        """msgs/s of `n` appends until their last vector is stored; CPU ms per message by process; host steal %;
        the commits' WAL flushes (count, mean ms)."""
        flushes = await wal_flushes(db)
        started, cpu, steal = time.perf_counter(), cpu_by_process(pids), StealMeter()
        await appends()
        await all_embedded()
        rate = n / (time.perf_counter() - started)
        spent = {f"{phase}_cpu_{k}": (v - cpu[k]) * 1000 / n for k, v in cpu_by_process(pids).items()}
        stolen = steal.percent()
        await asyncio.sleep(1.1)  # backends report their I/O statistics at most once a second
        count, ms = (after - before for after, before in zip(await wal_flushes(db), flushes, strict=True))
        return {phase: rate, f"{phase}_steal": stolen, **spent, f"{phase}_fsyncs": count / n,
                f"{phase}_fsync_ms": ms / count if count else float("nan")}

    async def one_writer() -> None:
        for t in texts[:sequential]:
            await one(0, t)

    async def writer(w: int) -> None:
        for t in texts[sequential + w * per_writer: sequential + (w + 1) * per_writer]:
            await one(w % users, t)

    async def writers_together() -> None:
        await asyncio.gather(*(writer(w) for w in range(writers)))

    return {**await measured("sequential", one_writer, sequential),
            **await measured("concurrent", writers_together, writers * per_writer)}


async def wal_flushes(db: Database) -> tuple[float, float]:
    """WAL flushes (fsyncs) made by client backends so far, and their total ms (PostgreSQL 18+'s pg_stat_io; the
    time needs track_wal_io_timing, turned on by `track_wal_flushes`). A commit waits for its flush: with one
    writer, the disk's flush latency bounds the rate."""
    async with db.engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT coalesce(sum(fsyncs), 0), coalesce(sum(fsync_time), 0) FROM pg_stat_io "
            "WHERE object = 'wal' AND backend_type = 'client backend'"))).one()
    return float(row[0]), float(row[1])


async def track_wal_flushes(db: Database) -> bool:
    """Turn on WAL I/O timing (ALTER SYSTEM: superuser). False where it cannot be."""
    try:
        async with db.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ALTER SYSTEM SET track_wal_io_timing = on"))
            await conn.execute(text("SELECT pg_reload_conf()"))
        return True
    except Exception as exc:  # noqa: BLE001 - a managed database may refuse: the flush times are then not shown
        print(f"  (WAL flush timing not available: {type(exc).__name__})")
        return False


async def bulk_load(db: Database, texts: list[str], vectors: np.ndarray, owner: list[str]) -> None:
    """Messages (text `i` is `owner[i]`'s, one conversation per user), inserted in bulk; HNSW rebuilt with the
    migration's parameters."""
    conv_of = {user: uuid.uuid4() for user in sorted(set(owner))}
    async with db.engine.begin() as conn:
        await conn.execute(text("DROP INDEX IF EXISTS messages_embedding_hnsw"))
        await conn.execute(
            text("INSERT INTO conversations (id, user_id) SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:us AS text[]))"),
            {"ids": list(conv_of.values()), "us": list(conv_of)})
    for start in range(0, len(texts), 5000):
        end = min(start + 5000, len(texts))
        async with db.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO messages (id, conversation_id, user_id, role, content, token_count, embedding) "
                "SELECT gen_random_uuid(), c, u, 2, t, 12, e FROM unnest(CAST(:c AS uuid[]), "
                "CAST(:u AS text[]), CAST(:t AS text[]), CAST(:e AS vector[])) AS x(c, u, t, e)"),
                {"c": [conv_of[owner[i]] for i in range(start, end)], "u": owner[start:end], "t": texts[start:end],
                 "e": vectors_param(vectors[start:end])})
    async with db.engine.begin() as conn:
        await conn.execute(text(
            "UPDATE conversations c SET message_count = m.n FROM (SELECT conversation_id, count(*) AS n "
            "FROM messages GROUP BY conversation_id) m WHERE m.conversation_id = c.id"))
    started = time.perf_counter()
    async with db.engine.begin() as conn:
        await conn.execute(text("SET maintenance_work_mem = '512MB'"))
        await conn.execute(text(
            "CREATE INDEX messages_embedding_hnsw ON messages USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = 16, ef_construction = 64)"))
    async with db.engine.connect() as conn:  # what autovacuum does to a live table: the visibility map that
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")  # index-only scans rely on, and stats
        await conn.execute(text("VACUUM (ANALYZE) messages"))
    print(f"  HNSW index over {len(texts)} vectors built in {time.perf_counter() - started:.0f} s")


async def bench_recall(store: MemoryStore, db: Database, vectors: np.ndarray, owner: list[str], users: list[str],
                       qvecs: np.ndarray, owned: int | None = None) -> dict[str, object]:
    """Query `i` (vector `qvecs[i]`) recalls `users[i]`'s 10 best; latency and recall@10 against an exact scan in
    numpy over `vectors` (`owner[j]` owns row `j`), and the plan of the last query. `owned`: the message count the
    plan is chosen by (None: each user's own, read as the service does)."""
    from services.memory.records import RecallQuery, Role

    owner_arr = np.array(owner)
    latencies, recalls = [], []
    for user, qvec in zip(users, qvecs, strict=True):
        q = RecallQuery(user_id=user, vector=qvec, top_k=10, min_score=0.0, conversation_ids=[],
                        roles=[Role.USER, Role.ASSISTANT], start_time=None, end_time=None, exclude_ids=[],
                        exclude_recent_conversation=None, exclude_recent_count=0)
        started = time.perf_counter()
        hits = await store.recall(q, owned)
        latencies.append((time.perf_counter() - started) * 1000)
        idx = np.nonzero(owner_arr == user)[0]
        exact = idx[np.argsort(-(vectors[idx] @ qvec))[:10]]
        # ANN-benchmarks style, robust to ties: a hit counts when it is at least as similar as the exact
        # 10th neighbour (within 1e-4; the corpus has many near-duplicate sentences)
        kth = float(np.min(vectors[exact] @ qvec))
        recalls.append(sum(1 for _, s in hits if s >= kth - 1e-4) / max(1, len(exact)))
    statement, params = store.recall_statement(q, owned if owned is not None else await store.owned_messages(user))
    async with db.engine.connect() as conn:  # what the planner chose for the last query: the label is checked
        plan = [r[0] for r in (await conn.execute(text("EXPLAIN " + statement.text), params)).all()]
    scans = sorted({line.strip().lstrip("-> ").split("  (")[0] for line in plan if " Scan " in line})
    return {"latency": latencies, "recall": float(np.mean(recalls)), "plan": "; ".join(scans)}


async def bench_rpc_recall_and_history(stub, users: int, queries: int) -> dict[str, list[float]]:
    rng = random.Random(5)
    recall, history = [], []
    for query in questions(queries, seed=5):
        user = f"pop-{rng.randrange(users)}"
        started = time.perf_counter()
        await stub.Recall(pb.RecallRequest(user_id=user, query=query, top_k=10))
        recall.append((time.perf_counter() - started) * 1000)
    conv = (await stub.CreateConversation(pb.CreateConversationRequest(user_id="history-user"))).conversation
    texts = corpus(200, seed=9)
    for i in range(0, 200, 20):
        await stub.AppendMessages(pb.AppendMessagesRequest(user_id="history-user", conversation_id=conv.conversation_id,
                                  messages=[pb.NewMessage(role=pb.ROLE_USER, content=t) for t in texts[i:i + 20]]))
    for _ in range(queries):
        started = time.perf_counter()
        await stub.ListMessages(pb.ListMessagesRequest(user_id="history-user", conversation_id=conv.conversation_id,
                                                       token_budget=1536, page_size=1000))
        history.append((time.perf_counter() - started) * 1000)
    return {"recall_rpc": recall, "history_rpc": history}


async def bench_documents(stub, chunks: int, queries: int) -> dict[str, object]:
    texts = corpus(chunks, seed=21)
    per_doc = 50
    started = time.perf_counter()
    stored = 0
    for d in range(0, chunks, per_doc):
        body = "\n\n".join(texts[d:d + per_doc])
        r = await stub.IngestDocument(pb.IngestDocumentRequest(
            user_id="docs-user", title=f"notes {d // per_doc}", source=f"notes-{d // per_doc}.md", content=body,
            chunk_tokens=16, chunk_overlap=2, visibility=pb.VISIBILITY_SHARED))
        stored += r.document.chunk_count
    ingest_s = time.perf_counter() - started
    latencies = []
    for query in questions(queries, seed=8):
        started = time.perf_counter()
        await stub.SearchDocuments(pb.SearchDocumentsRequest(user_id="docs-user", query=query, top_k=5))
        latencies.append((time.perf_counter() - started) * 1000)
    return {"ingest_s": ingest_s, "latency": latencies, "chunks": stored}


async def bench_langchain(database_url: str, model, texts: list[str], vectors: np.ndarray, owner: list[str],
                          users: int, queries: int, add_n: int) -> dict[str, object] | None:
    try:
        from langchain_core.embeddings import Embeddings
        from langchain_postgres import PGVector
    except ImportError:
        print("  langchain-postgres not installed: pip install -e '.[bench]' (peer skipped)")
        return None

    class SameModel(Embeddings):
        def embed_documents(self, docs):
            return model.encode(docs, normalize_embeddings=True, batch_size=64).tolist()

        def embed_query(self, q):
            return model.encode([q], normalize_embeddings=True)[0].tolist()

    url = database_url.replace("postgresql+asyncpg", "postgresql+psycopg")
    store = await asyncio.to_thread(lambda: PGVector(embeddings=SameModel(), collection_name="bench",
                                                     connection=url, use_jsonb=True, pre_delete_collection=True))
    add_texts = corpus(add_n, seed=11)
    started = time.perf_counter()
    for t in add_texts:  # batch 1, like the service's sequential writer
        await asyncio.to_thread(store.add_texts, [t], [{"user_id": "ingest-0"}])
    add_rate = add_n / (time.perf_counter() - started)
    for start in range(0, len(texts), 5000):
        await asyncio.to_thread(store.add_embeddings, texts[start:start + 5000], vectors[start:start + 5000].tolist(),
                                [{"user_id": u} for u in owner[start:start + 5000]])
    rng = random.Random(3)
    latencies = []
    for query in questions(queries, seed=3):
        user = f"pop-{rng.randrange(users)}"
        q = model.encode([query], normalize_embeddings=True)[0].tolist()
        started = time.perf_counter()
        await asyncio.to_thread(store.similarity_search_with_score_by_vector, q, 10, {"user_id": user})
        latencies.append((time.perf_counter() - started) * 1000)
    return {"add_rate": add_rate, "latency": latencies}


async def ingestion(url: str, tmp: Path, args: argparse.Namespace) -> dict[bool, dict[str, float]]:
    """Ingestion against the memory service in its own process (`parley serve memory`), as callers reach it."""
    port = free_port()
    env = {"DATABASE_URL": url, "PARLEY_MEMORY_PORT": str(port), "PARLEY_METRICS_PORT": "0",
           "PARLEY_LOG_LEVEL": "WARNING", "PARLEY_DATA_DIR": str(tmp)}
    print(f"== ingestion through gRPC to `parley serve memory` ({args.sequential} sequential appends, "
          f"{args.writers} writers x {args.per_writer}; one message per call; clock stops when the last vector "
          "is stored)")
    print(f"  {args.rounds} rounds of each (new users and texts each round): median (each round); goal >= 300 msgs/s")
    results = {}
    with process([sys.executable, "-m", "parley.cli", "serve", "memory"], env, str(tmp / "memory.log")) as proc:
        wait_serving(f"127.0.0.1:{port}", proc)
        pids = {"server": proc.pid}
        if (tmp / "pg" / "postmaster.pid").exists():  # the embedded PostgreSQL: its backends are its children
            pids["postgres"] = int((tmp / "pg" / "postmaster.pid").read_text().split()[0])
        channel = make_channel(f"127.0.0.1:{port}")
        db = Database(url)
        try:
            if "postgres" in pids:  # the embedded server is ours to configure; a given DATABASE_URL's is not
                await track_wal_flushes(db)
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            modes = ((True, "async_embedding (vectors follow the commit)"),
                     (False, "synchronous (each call waits for its vectors)"))
            for mode, label in modes[:1] if args.async_only else modes:
                rounds = [await bench_ingestion(stub, db, args.writers, args.sequential, args.writers,
                                                args.per_writer, mode, f"{'a' if mode else 's'}{r}",
                                                seed=100 * r + mode, pids=pids) for r in range(args.rounds)]
                results[mode] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}

                def spread(key: str, rounds=rounds) -> str:
                    values = [r[key] for r in rounds]
                    return f"{statistics.median(values):.0f} (rounds: {', '.join(f'{x:.0f}' for x in values)})"

                print(f"  {label}: batch 1, one writer {spread('sequential')} msgs/s; "
                      f"{args.writers} concurrent writers {spread('concurrent')} msgs/s")
                for phase in ("sequential", "concurrent"):  # CPU cost: steadier than rates on a shared machine
                    costs = ", ".join(f"{name} {results[mode][f'{phase}_cpu_{name}']:.2f}"
                                      for name in ("client", *pids))
                    print(f"    CPU ms per message, {'one writer' if phase == 'sequential' else 'concurrent'}: "
                          f"{costs} (host steal {results[mode][f'{phase}_steal']:.1f}%; WAL flushes per message "
                          f"{results[mode][f'{phase}_fsyncs']:.2f}, mean {results[mode][f'{phase}_fsync_ms']:.2f} ms)")
        finally:
            await channel.close()
            await db.close()
    return results


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging("WARNING", json=False)
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        async with embedded_postgres(Path(tmp) / "pg") if not os.environ.get("DATABASE_URL") else _given() as url:
            await migrate(url)
            ingest = (await ingestion(url, Path(tmp), args))[True]
            if args.only_ingestion:
                return
            settings = Settings(_env_file=None, database_url=url, data_dir=Path(tmp), metrics_port=0,
                                log_level="WARNING", log_json=False)
            async with running(settings, ["memory"], port=0, embedded=False) as app:
                channel = make_channel(app.address)
                stub = memory_pb2_grpc.MemoryServiceStub(channel)
                db = Database(url)
                store = MemoryStore(db.engine, derived_engine=db.derived_engine)
                embedder = await bench_embedder()
                print(f"== recall at {args.messages} messages, {args.users} users")
                texts = corpus(args.messages)
                vectors = await embed_cached(embedder, texts, "messages")
                owner = [f"pop-{i % args.users}" for i in range(len(texts))]
                await bulk_load(db, texts, vectors, owner)
                per_user = args.messages // args.users
                rng = random.Random(3)
                asked = [f"pop-{rng.randrange(args.users)}" for _ in range(args.queries)]
                qvecs = await embedder.embed(questions(args.queries, seed=3))
                store.exact_recall_max_messages = 0
                hnsw = await bench_recall(store, db, vectors, owner, asked, qvecs)
                print(f"  HNSW path (m=16, ef_construction=64, ef_search={HNSW_EF_SEARCH}, iterative_scan="
                      f"relaxed_order): {summary_ms(hnsw['latency'])}; recall@10 vs exact {hnsw['recall']:.3f}")
                print(f"    plan: {hnsw['plan']}")
                store.exact_recall_max_messages = Settings(_env_file=None).memory.exact_recall_max_messages
                rec = await bench_recall(store, db, vectors, owner, asked, qvecs)
                path = "exact scan of the user's rows" if per_user <= store.exact_recall_max_messages else "HNSW"
                print(f"  default path ({per_user} messages per user -> {path}): {summary_ms(rec['latency'])}; "
                      f"recall@10 vs exact {rec['recall']:.3f} (goals: p95 <= 15 ms, recall@10 >= 0.95)")
                print(f"    plan: {rec['plan']}")
                rpc = await bench_rpc_recall_and_history(stub, args.users, args.queries)
                print(f"  Recall RPC (embeds each query too: {args.queries} distinct texts): {summary_ms(rpc['recall_rpc'])}")
                print(f"== history fetch (ListMessages, token budget 1536, 200-message conversation): "
                      f"{summary_ms(rpc['history_rpc'])}")

                print(f"== hybrid document search at {args.chunks} chunks")
                docs = await bench_documents(stub, args.chunks, args.queries)
                print(f"  ingested {docs['chunks']} chunks in {docs['ingest_s']:.0f} s; "
                      f"SearchDocuments RPC (query embedded; distinct texts): {summary_ms(docs['latency'])}")

                print("== peer: langchain-postgres PGVector, same database, same model")
                model = embedder._model  # the very same loaded SentenceTransformer
                peer = await bench_langchain(url, model, texts, vectors, owner, args.users, args.queries,
                                             args.sequential)
                rows = [
                    ("ingest msgs/s (batch 1, one writer)", f"{ingest['sequential']:.0f}",
                     f"{peer['add_rate']:.0f}" if peer else "-",
                     f"{ingest['sequential'] / peer['add_rate']:.2f}x" if peer else "-"),
                    ("recall p50 ms (vector given)", f"{pct(rec['latency'], 50):.2f}",
                     f"{pct(peer['latency'], 50):.2f}" if peer else "-",
                     f"{pct(peer['latency'], 50) / pct(rec['latency'], 50):.2f}x faster" if peer else "-"),
                    ("recall p95 ms (vector given)", f"{pct(rec['latency'], 95):.2f}",
                     f"{pct(peer['latency'], 95):.2f}" if peer else "-",
                     f"{pct(peer['latency'], 95) / pct(rec['latency'], 95):.2f}x faster" if peer else "-"),
                ]
                print(table(rows, ("figure", "Parley", "LangChain PGVector", "ratio")))
                await channel.close()
                await db.close()


async def bench_embedder() -> Embedder:
    """An embedder of the benchmark's own (the service's is in the service) for bulk work: corpus and queries.
    Compiled as the service's is (`precision auto`): the 100k-message corpus took 489 s to embed with plain
    PyTorch here. Its `_model` is the loaded SentenceTransformer, which the LangChain peer runs as its users do."""
    embedder = await Embedder.load(None, batch_size=128, max_wait_ms=1)
    embedder.start()
    return embedder


class _given:
    async def __aenter__(self):
        return os.environ["DATABASE_URL"]

    async def __aexit__(self, *exc):
        return False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--per-writer", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="ingestion rounds per mode (the median is quoted)")
    parser.add_argument("--only-ingestion", action="store_true", help="stop after the ingestion figures")
    parser.add_argument("--async-only", action="store_true",
                        help="ingestion with `async_embedding` only (the mode the goal is about), not synchronous")
    asyncio.run(main(parser.parse_args()))
