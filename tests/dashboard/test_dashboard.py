"""The operator dashboard against the real embedded PostgreSQL (its own database, so numbers are exact),
rendered with Streamlit's AppTest (no browser)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import queries as q
from parley.runtime.db import migrate

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
NOW = datetime.now(UTC)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def _insert_usage(conn: asyncpg.Connection, **row) -> None:
    cols = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(f"INSERT INTO usage_records ({cols}) VALUES ({params})", *row.values())


@pytest.fixture(scope="module")
async def dash_db(database_url: str) -> str:
    """A fresh, migrated database in the session's PostgreSQL, with known usage rows."""
    name = f"dash_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(q.asyncpg_dsn(database_url))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = _with_database(database_url, name)
    await migrate(url)
    conn = await asyncpg.connect(q.asyncpg_dsn(url))
    try:
        ago = lambda **kw: NOW - timedelta(**kw)  # noqa: E731
        s1, s2 = uuid.uuid4(), uuid.uuid4()
        # alice: two priced turns; the second made two model calls (a tool round)
        await _insert_usage(conn, created_at=ago(hours=2), user_id="alice", session_id=s1, request_id="r-a1",
                            model="gpt-4o-mini", provider="openai", prompt_tokens=100, completion_tokens=20,
                            cost_usd=0.0012, priced=True, latency_ms=800.0)
        await _insert_usage(conn, created_at=ago(minutes=70), user_id="alice", session_id=s1, request_id="r-a2",
                            model="gpt-4o-mini", provider="openai", prompt_tokens=200, completion_tokens=10,
                            cost_usd=0.0010, priced=True, latency_ms=500.0, tool_called="sales_query")
        await _insert_usage(conn, created_at=ago(minutes=69), user_id="alice", session_id=s1, request_id="r-a2",
                            model="gpt-4o-mini", provider="openai", prompt_tokens=300, completion_tokens=40,
                            cost_usd=0.0020, priced=True, latency_ms=700.0)
        # bob: the local model (no price) and one answer-cache hit
        await _insert_usage(conn, created_at=ago(minutes=30), user_id="bob", session_id=s2, request_id="r-b1",
                            model="smollm2-135m-instruct", provider="local", prompt_tokens=50, completion_tokens=30,
                            cost_usd=None, priced=False, estimated=False, latency_ms=300.0)
        await _insert_usage(conn, created_at=ago(minutes=10), user_id="bob", session_id=s2, request_id="r-b2",
                            model="smollm2-135m-instruct", provider="local", cost_usd=None, priced=False,
                            latency_ms=2.0, cache_hit=True, kind="cache")
        # carol: ten days ago, outside the 24 h window
        await _insert_usage(conn, created_at=ago(days=10), user_id="carol", request_id="r-c1", model="gpt-4o",
                            provider="openai", prompt_tokens=1000, completion_tokens=500, cost_usd=5.0,
                            priced=True, latency_ms=2000.0)
        conv = uuid.uuid4()
        await conn.execute("INSERT INTO conversations (id, user_id, message_count) VALUES ($1, 'alice', 2)", conv)
        for content in ("hi", "hello"):
            await conn.execute(
                "INSERT INTO messages (id, conversation_id, user_id, role, content, token_count) "
                "VALUES ($1, $2, 'alice', 2, $3, 1)", uuid.uuid4(), conv, content)
    finally:
        await conn.close()
    return url


@pytest.fixture
def dashboard_env(monkeypatch, dash_db):
    monkeypatch.setenv("DATABASE_URL", dash_db)
    for name in ("CHAT", "MEMORY", "INFERENCE", "TOOLS"):
        monkeypatch.delenv(f"PARLEY_{name}_ADDR", raising=False)
    monkeypatch.setenv("PARLEY_CHAT_ADDR", f"127.0.0.1:{_free_port()}")  # nothing listens: UNREACHABLE
    monkeypatch.setenv("PARLEY_METRICS_PORT", "0")
    monkeypatch.chdir(Path(APP).parent)  # no stray .env
    return dash_db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _deltas(at: AppTest) -> dict[str, str]:
    return {m.label: m.delta for m in at.metric}


def _table(at: AppTest, first_column: str):
    [df] = [d.value for d in at.dataframe if len(d.value.columns) and d.value.columns[0] == first_column]
    return df


def test_queries_overview_exact(dash_db):
    snap = q.load(dash_db, "Last 24 hours", now=NOW + timedelta(seconds=1))
    o = snap.overview
    assert (o.turns, o.cache_hits, o.model_calls, o.users) == (4, 1, 4, 2)
    assert o.total_tokens == 750
    assert (o.cost.priced_calls, o.cost.unpriced_calls) == (3, 1)
    assert o.cost.usd == pytest.approx(0.0042)
    assert o.cost.label() == "$0.0042 + unpriced"
    assert o.p50_latency_ms == pytest.approx(800)  # turns: 800, 500+700, 300 (the cache hit is excluded)
    assert o.p95_latency_ms == pytest.approx(1160)
    assert o.cache_hit_rate == pytest.approx(0.25)
    assert (snap.storage.conversations, snap.storage.messages) == (1, 2)


def test_cost_labels():
    assert q.Cost(0, 0, 3).label() == "unpriced"
    assert q.Cost(0, 0, 0).label() == "—"
    assert q.Cost(0.000315, 2, 0).label() == "$0.000315"
    assert q.Cost(12.3, 5, 1).label() == "$12.30 + unpriced"


def test_dashboard_renders_usage(dashboard_env):
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    m = _metrics(at)
    assert m["Turns"] == "4"
    assert m["Tokens"] == "750"
    # the cost of priced calls, with the unpriced call counted beside it (never folded in as $0)
    assert m["Cost"] == "$0.0042"
    assert _deltas(at)["Cost"] == "+ 1 call unpriced"
    assert m["p50 latency"] == "800 ms" and m["p95 latency"] == "1.16 s"
    assert m["Cache hit rate"] == "25%"
    assert m["Active users"] == "2" and m["Model calls"] == "4"
    assert m["Conversations"] == "1" and m["Messages"] == "2"
    assert any("1 of 4 model calls are **unpriced**" in c.value for c in at.caption)

    models = _table(at, "model").set_index("model")
    assert models.loc["gpt-4o-mini", "cost"] == "$0.0042" and models.loc["gpt-4o-mini", "calls"] == 3
    # the local model has no price: shown as unpriced, never $0
    assert models.loc["smollm2-135m-instruct", "cost"] == "unpriced"
    assert models.loc["smollm2-135m-instruct", "cache_hits"] == 1
    assert "gpt-4o" not in models.index  # carol's row is outside the window

    users = _table(at, "user_id")
    assert list(users["user_id"]) == ["alice", "bob"]
    assert list(users["cost"]) == ["$0.0042", "unpriced"]
    assert list(users["tokens"]) == [670, 80]

    recent = _table(at, "time")
    assert list(recent["request_id"][:3]) == ["r-b2", "r-b1", "r-a2"]
    assert list(recent["cost"][:2]) == ["cache hit", "unpriced"]


def test_window_all_time_includes_old_rows(dashboard_env):
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.selectbox(key="window").set_value("All time").run()
    assert not at.exception
    m = _metrics(at)
    assert m["Turns"] == "5" and m["Cost"] == "$5.00"
    users = _table(at, "user_id")
    assert users.iloc[0]["user_id"] == "carol" and users.iloc[0]["cost"] == "$5.00"


def test_only_unpriced_usage_shows_unpriced_not_zero(monkeypatch, dash_db):
    """A window whose only model calls are unpriced: Cost reads 'unpriced', never $0."""
    snap = q.load(dash_db, "Last hour", now=NOW + timedelta(seconds=1))
    assert snap.overview.cost.label() == "unpriced"  # only bob's local-model call and cache hit are that recent
    monkeypatch.setenv("DATABASE_URL", dash_db)
    monkeypatch.setenv("PARLEY_CHAT_ADDR", f"127.0.0.1:{_free_port()}")
    monkeypatch.setenv("PARLEY_METRICS_PORT", "0")
    monkeypatch.chdir(Path(APP).parent)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.selectbox(key="window").set_value("Last hour").run()
    assert _metrics(at)["Cost"] == "unpriced"
    assert _deltas(at)["Cost"] == "1 call, no price configured"
    assert _table(at, "model").set_index("model").loc["smollm2-135m-instruct", "cost"] == "unpriced"


def test_missing_database_url_is_explained(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("PARLEY_DATABASE_URL", raising=False)
    monkeypatch.setenv("PARLEY_CHAT_ADDR", f"127.0.0.1:{_free_port()}")
    monkeypatch.chdir(Path(APP).parent)
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception
    assert "DATABASE_URL is not set" in at.error[0].value


async def test_service_health_and_metrics(dashboard_env, start_stack, monkeypatch):
    """A real memory server with its /metrics: SERVING and reachable; the absent services UNREACHABLE."""
    metrics_port = _free_port()
    async with start_stack(["memory"], metrics_port=metrics_port) as app:
        monkeypatch.setenv("PARLEY_MEMORY_ADDR", app.address)
        monkeypatch.setenv("PARLEY_METRICS_PORT", str(metrics_port))
        at = AppTest.from_file(APP, default_timeout=60)
        await asyncio.to_thread(at.run)  # the gRPC server runs on this loop: render in a thread
    assert not at.exception, at.exception
    services = _table(at, "service").set_index("service")
    assert services.loc["memory", "health"] == "SERVING"
    assert services.loc["memory", "metrics"] == "reachable"
    assert services.loc["chat", "health"] == "UNREACHABLE"
    assert any("1 of 4 services SERVING" in w.value for w in at.warning)


def test_parley_dashboard_command_starts_streamlit_on_the_app(tmp_path):
    """`parley dashboard` (parley.health.run_dashboard) runs `streamlit run dashboard/app.py`: start it for real."""
    import subprocess
    import sys
    import time
    import urllib.request

    from parley.health import dashboard_command

    port = _free_port()
    cmd = dashboard_command(port=port)
    assert cmd[1:5] == ["-m", "streamlit", "run", APP]
    env = {**os.environ, "PARLEY_CHAT_ADDR": f"127.0.0.1:{_free_port()}"}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as resp:
                    assert resp.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None, "streamlit exited"
                assert time.monotonic() < deadline, "streamlit did not come up"
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(10)
    assert sys.executable == cmd[0]
