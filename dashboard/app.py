"""Parley operator dashboard.

    streamlit run dashboard/app.py          (DATABASE_URL and PARLEY_<SVC>_ADDR from the environment or .env)

Read-only: usage (turns, tokens, cost, latency, cache hits) from `usage_records`, storage counts, and the
services' gRPC health and Prometheus counters. Queries live in dashboard/queries.py; this file only renders.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run` puts dashboard/ on sys.path, not the repository
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard import queries as q  # noqa: E402
from parley import health  # noqa: E402
from parley.runtime.config import SERVICE_NAMES, Settings  # noqa: E402


def safe_url(url: str) -> str:
    """DATABASE_URL without its password, for display."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        netloc = f"{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else netloc
    return parts._replace(netloc=netloc, query=("…" if parts.query else "")).geturl()


def service_addresses(settings: Settings) -> dict[str, str]:
    """PARLEY_<SVC>_ADDR, else the chat address (`parley up` serves all four on one port)."""
    chat = settings.chat_addr or f"127.0.0.1:{settings.chat_port}"
    return {name: getattr(settings, f"{name}_addr") or chat for name in SERVICE_NAMES}


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def cost_metric(cost: q.Cost) -> tuple[str, str | None]:
    """(value, note) of the Cost metric: dollars of the priced calls, and how many calls had no price."""
    calls = f"{cost.unpriced_calls:,} call{'s' if cost.unpriced_calls != 1 else ''}"
    if cost.priced_calls == 0:
        return cost.label(), (f"{calls}, no price configured" if cost.unpriced_calls else None)
    note = f"+ {calls} unpriced"
    return q.format_usd(cost.usd), (note if cost.unpriced_calls else None)


def render_overview(snap: q.Snapshot) -> None:
    o = snap.overview
    st.subheader("Overview")
    top, bottom = st.columns(4), st.columns(4)
    top[0].metric("Turns", fmt_int(o.turns), border=True)
    top[1].metric("Tokens", fmt_int(o.total_tokens), border=True,
                  help=f"{o.prompt_tokens:,} prompt + {o.completion_tokens:,} completion")
    cost_value, cost_note = cost_metric(o.cost)
    top[2].metric("Cost", cost_value, delta=cost_note, delta_color="off", delta_arrow="off", border=True,
                  help="Sum of priced model calls. Calls to models without a price are counted as unpriced, "
                       "never as $0.")
    rate = o.cache_hit_rate
    top[3].metric("Cache hit rate", "—" if rate is None else f"{rate:.0%}", border=True,
                  help=f"{o.cache_hits:,} of {o.turns:,} turns answered from the answer cache")
    bottom[0].metric("p50 latency", fmt_ms(o.p50_latency_ms), border=True,
                     help="Model time per turn (cache hits excluded).")
    bottom[1].metric("p95 latency", fmt_ms(o.p95_latency_ms), border=True,
                     help="Model time per turn (cache hits excluded).")
    bottom[2].metric("Model calls", fmt_int(o.model_calls), border=True)
    bottom[3].metric("Active users", fmt_int(o.users), border=True)
    notes = []
    if o.cost.unpriced_calls:
        notes.append(f"{o.cost.unpriced_calls:,} of {o.model_calls:,} model calls are **unpriced** (no price "
                     "configured for their model) and not included in the cost.")
    if o.estimated_calls:
        notes.append(f"{o.estimated_calls:,} model calls have estimated token counts.")
    if notes:
        st.caption(" ".join(notes))
    if not snap.activity.empty:
        chart = snap.activity.set_index("bucket")[["tokens"]]
        st.bar_chart(chart, height=180, y_label="tokens", x_label="")


def render_storage(storage: q.StorageCounts) -> None:
    st.subheader("Storage")
    c = st.columns(4)

    def show(col, label, value):
        col.metric(label, "—" if value is None else fmt_int(value))

    show(c[0], "Conversations", storage.conversations)
    show(c[1], "Messages", storage.messages)
    show(c[2], "Documents", storage.documents)
    show(c[3], "Users with conversations", storage.users_with_conversations)


def render_services(settings: Settings) -> None:
    st.subheader("Services")
    addrs = service_addresses(settings)
    statuses = health.check_all(addrs, timeout_s=1.5)
    metrics: dict[str, health.MetricsSummary] = {}
    rows = []
    for name in SERVICE_NAMES:
        url = health.metrics_url(addrs[name], settings.metrics_port) if settings.metrics_port else ""
        if url and url not in metrics:
            metrics[url] = health.scrape(url, timeout_s=1.5)
        m = metrics.get(url)
        rate = m.error_rate if m and m.reachable else None
        rows.append({
            "service": name,
            "address": addrs[name],
            "health": statuses[name],
            "metrics": ("reachable" if m.reachable else "not reachable") if m else "disabled",
            "grpc_requests": int(m.total) if m and m.reachable else None,
            "error_rate": None if rate is None else f"{rate:.1%}",
        })
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    serving = sum(s == "SERVING" for s in statuses.values())
    (st.success if serving == len(statuses) else st.warning)(f"{serving} of {len(statuses)} services SERVING")
    for m in metrics.values():
        if m.reachable and m.requests_by_method:
            with st.expander(f"gRPC requests at {m.url}"):
                by_method = pd.DataFrame(sorted(m.requests_by_method.items(), key=lambda kv: -kv[1]),
                                         columns=["method", "requests"])
                st.dataframe(by_method, hide_index=True, width="stretch")


# Short headers, so the tables fit without scrolling sideways (the data keeps its full column names).
COLUMNS = {
    "prompt_tokens": st.column_config.NumberColumn("prompt tok"),
    "completion_tokens": st.column_config.NumberColumn("compl. tok"),
    "cache_hits": st.column_config.NumberColumn("cache hits"),
    "unpriced_calls": st.column_config.NumberColumn("unpriced"),
    "p50_ms": st.column_config.NumberColumn("p50 ms", format="%.0f"),
    "p95_ms": st.column_config.NumberColumn("p95 ms", format="%.0f"),
    "latency_ms": st.column_config.NumberColumn("ms", format="%.0f"),
    "time": st.column_config.DatetimeColumn("time (UTC)", format="YYYY-MM-DD HH:mm:ss", timezone="UTC"),
    "last_seen": st.column_config.DatetimeColumn("last seen (UTC)", format="YYYY-MM-DD HH:mm", timezone="UTC"),
    "session_id": st.column_config.TextColumn("session", width="small"),
    "request_id": st.column_config.TextColumn("request", width="small"),
}


def main() -> None:
    st.set_page_config(page_title="Parley operations", page_icon="💬", layout="wide")
    settings = Settings()
    with st.sidebar:
        st.header("Parley")
        window = st.selectbox("Window", list(q.WINDOWS), index=list(q.WINDOWS).index(q.DEFAULT_WINDOW), key="window")
        top_users = st.slider("Top users", 5, 100, 20, step=5, key="top_users")
        st.button("Refresh", key="refresh")  # any interaction reruns the script and re-reads
        st.caption(f"Database: `{safe_url(settings.database_url)}`" if settings.database_url else "Database: not set")

    st.title("Parley operations")
    if not settings.database_url:
        st.error("DATABASE_URL is not set: set it to the PostgreSQL Parley uses (read-only access is enough).")
    else:
        try:
            snap = q.load(settings.database_url, window, top_users=top_users)
        except Exception as exc:  # noqa: BLE001 - show the operator what failed instead of a stack trace
            st.error(f"Could not read the database: {type(exc).__name__}: {exc}")
            snap = None
        if snap is not None:
            st.caption(f"{window} · read {snap.read_at:%Y-%m-%d %H:%M:%S} UTC")
            if not snap.usage_table:
                st.warning("No usage_records table yet: run `parley migrate` (migration 0003_chat).")
            else:
                render_overview(snap)
                st.subheader("By model and provider")
                st.dataframe(snap.by_model, hide_index=True, width="stretch", column_config=COLUMNS)
                st.subheader("Top users")
                st.dataframe(snap.by_user, hide_index=True, width="stretch", column_config=COLUMNS)
                st.subheader("Recent turns")
                st.caption("The latest usage rows (one per model call or cache hit), newest first.")
                st.dataframe(snap.recent, hide_index=True, width="stretch", column_config=COLUMNS)
            if snap.storage:
                render_storage(snap.storage)
    render_services(settings)


main()
