"""The sales database: report queries and demo data for `sales.daily_sales`.

One row is one sales rep's closed deals for one product on one day (date, region,
product, rep, deals closed, amount). Reports are built with SQLAlchemy Core from
a fixed vocabulary (period, grouping, metric, filters), every value a bound
parameter, in a READ ONLY transaction with a statement timeout: the model never
writes SQL.

Demo data (`seed_demo_data`) is realistic and deterministic: each day's rows come
from an RNG seeded by (seed, date), so seeding is idempotent, a later run only
adds the days since the last one, and "last month" always has data. Demo rows are
flagged `demo = true`; seeding refuses to mix them into a table that holds real
data.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    delete,
    exists,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from parley.runtime.config import Settings
from services.tools.core import ToolError

metadata = MetaData(schema="sales")
daily_sales = Table(
    "daily_sales",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("sale_date", Date, nullable=False),
    Column("region", Text, nullable=False),
    Column("product", Text, nullable=False),
    Column("sales_rep", Text, nullable=False),
    Column("deals_closed", Integer, nullable=False),
    Column("amount", Numeric(14, 2), nullable=False),
    Column("demo", Boolean, nullable=False),
)

PERIODS = (
    "today", "yesterday", "this_week", "last_week", "this_month", "last_month", "this_quarter", "last_quarter",
    "this_year", "last_year", "last_7_days", "last_30_days", "custom",
)
GROUPINGS = ("none", "region", "product", "sales_rep", "month")
METRICS = ("deals_closed", "amount", "both")
FILTERS = ("region", "product", "sales_rep")
MAX_RANGE_DAYS = 3660
MAX_ROWS = 500
QUERY_TIMEOUT_MS = 5000
_SEED_LOCK = 0x73616C6573  # "sales": one seeding at a time across processes


# --- periods ---------------------------------------------------------------------------------------------------


def _quarter_start(d: date) -> date:
    return date(d.year, 3 * ((d.month - 1) // 3) + 1, 1)


def _month_before(d: date) -> date:
    """First day of the month before d's month."""
    return date(d.year - 1, 12, 1) if d.month == 1 else date(d.year, d.month - 1, 1)


def resolve_period(period: str, today: date, start: date | None = None, end: date | None = None) -> tuple[date, date]:
    """The first and last day (inclusive) of a named period; "this_*" periods end today."""
    if period == "custom":
        if start is None or end is None:
            raise ToolError("period 'custom' needs start_date and end_date (YYYY-MM-DD)")
        if end < start:
            raise ToolError(f"end_date {end} is before start_date {start}")
        if (end - start).days >= MAX_RANGE_DAYS:
            raise ToolError(f"the range is longer than {MAX_RANGE_DAYS} days")
        return start, end
    if period == "today":
        return today, today
    if period == "yesterday":
        return today - timedelta(days=1), today - timedelta(days=1)
    if period == "this_week":
        return today - timedelta(days=today.weekday()), today
    if period == "last_week":
        monday = today - timedelta(days=today.weekday() + 7)
        return monday, monday + timedelta(days=6)
    if period == "this_month":
        return today.replace(day=1), today
    if period == "last_month":
        first = _month_before(today)
        return first, today.replace(day=1) - timedelta(days=1)
    if period == "this_quarter":
        return _quarter_start(today), today
    if period == "last_quarter":
        this_q = _quarter_start(today)
        return _quarter_start(this_q - timedelta(days=1)), this_q - timedelta(days=1)
    if period == "this_year":
        return date(today.year, 1, 1), today
    if period == "last_year":
        return date(today.year - 1, 1, 1), date(today.year - 1, 12, 31)
    if period == "last_7_days":
        return today - timedelta(days=6), today
    if period == "last_30_days":
        return today - timedelta(days=29), today
    raise ToolError(f"unknown period {period!r}; use one of {', '.join(PERIODS)}")


def today_in(timezone: str) -> date:
    return datetime.now(ZoneInfo(timezone)).date()


# --- reports ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportQuery:
    period: str
    group_by: str = "none"
    metric: str = "both"
    start_date: date | None = None
    end_date: date | None = None
    region: str | None = None
    product: str | None = None
    sales_rep: str | None = None

    def filters(self) -> dict[str, str]:
        return {name: value for name in FILTERS if (value := getattr(self, name))}


def _dimension(group_by: str):
    c = daily_sales.c
    if group_by == "month":
        # The format is a constant of ours (not a bound value) so that GROUP BY matches the select list.
        return func.to_char(c.sale_date, literal_column("'YYYY-MM'"))
    return {"region": c.region, "product": c.product, "sales_rep": c.sales_rep}[group_by]


def _money(value: Any) -> float:
    return float(Decimal(value or 0).quantize(Decimal("0.01")))


async def sales_report(engine: AsyncEngine, q: ReportQuery, today: date, currency: str = "USD") -> dict[str, Any]:
    """Deals closed and/or amount for a period, optionally grouped and filtered."""
    if q.group_by not in GROUPINGS or q.metric not in METRICS:
        raise ToolError("group_by or metric is not one of the allowed values")
    start, end = resolve_period(q.period, today, q.start_date, q.end_date)
    c = daily_sales.c
    where = [c.sale_date >= start, c.sale_date <= end]
    where += [func.lower(getattr(c, name)) == value.strip().lower() for name, value in q.filters().items()]
    deals = func.coalesce(func.sum(c.deals_closed), 0).label("deals_closed")
    amount = func.coalesce(func.sum(c.amount), 0).label("amount")

    totals_stmt = select(deals, amount).where(*where)
    rows_stmt = None
    if q.group_by != "none":
        dim = _dimension(q.group_by).label(q.group_by)
        order = dim.asc() if q.group_by == "month" else (deals if q.metric == "deals_closed" else amount).desc()
        rows_stmt = select(dim, deals, amount).where(*where).group_by(dim).order_by(order, dim).limit(MAX_ROWS)

    async with _read_only(engine) as conn:
        total = (await conn.execute(totals_stmt)).one()
        grouped = (await conn.execute(rows_stmt)).all() if rows_stmt is not None else []
        hints = await _filter_hints(conn, q) if q.filters() and not total.deals_closed else {}

    def figures(row: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if q.metric in ("deals_closed", "both"):
            out["deals_closed"] = int(row.deals_closed)
        if q.metric in ("amount", "both"):
            out["amount"] = _money(row.amount)
        return out

    result: dict[str, Any] = {
        "period": q.period,
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
        "group_by": q.group_by,
        "metric": q.metric,
        "currency": currency,
        "filters": q.filters(),
        "totals": figures(total),
    }
    if q.group_by != "none":
        result["rows"] = [{q.group_by: row[0], **figures(row)} for row in grouped]
    if hints:
        result["note"] = "no sales match the filters; known values: " + "; ".join(
            f"{name}: {', '.join(values)}" for name, values in hints.items()
        )
    return result


async def _filter_hints(conn: AsyncConnection, q: ReportQuery) -> dict[str, list[str]]:
    """For each filter that matches nothing at all: the values that exist (so the model can retry)."""
    hints: dict[str, list[str]] = {}
    for name, value in q.filters().items():
        col = getattr(daily_sales.c, name)
        if await conn.scalar(select(exists().where(func.lower(col) == value.strip().lower()))):
            continue
        values = await conn.scalars(select(col).distinct().order_by(col).limit(50))
        hints[name] = list(values)
    return hints


@asynccontextmanager
async def _read_only(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        await conn.execute(text("SET TRANSACTION READ ONLY"))
        await conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(QUERY_TIMEOUT_MS)})
        yield conn
        await conn.rollback()


# --- demo data -------------------------------------------------------------------------------------------------

DEFAULT_SEED = 20261121
DEFAULT_DAYS = 730

REPS: dict[str, tuple[str, ...]] = {
    "North America": ("Alice Johnson", "Marcus Lee", "Priya Patel", "Tom Becker"),
    "EMEA": ("Sophie Martin", "Lukas Schneider", "Amara Okafor"),
    "APAC": ("Kenji Tanaka", "Mei Chen", "Arjun Rao"),
    "LATAM": ("Lucia Fernandez", "Diego Santos"),
}
REGION_RATE = {"North America": 1.0, "EMEA": 0.85, "APAC": 0.75, "LATAM": 0.55}
# product: (share of deals, typical deal size)
PRODUCTS: dict[str, tuple[float, float]] = {
    "Parley Cloud": (0.34, 12_000.0),
    "Parley Enterprise": (0.08, 55_000.0),
    "Analytics Add-on": (0.24, 6_500.0),
    "Support Plus": (0.22, 3_200.0),
    "Onboarding Services": (0.12, 9_000.0),
}
_WEEKDAY_RATE = (1.0, 1.05, 1.05, 1.0, 0.85, 0.12, 0.04)
_MONTH_RATE = (0.8, 0.9, 1.15, 0.95, 1.0, 1.15, 0.85, 0.8, 1.15, 1.05, 1.15, 1.35)
_GROWTH_EPOCH = date(2024, 1, 1)


def _poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def demo_rows(day: date, seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """The demo rows of one day: the same for the same (day, seed), whenever they are made."""
    rng = random.Random(f"parley-sales:{seed}:{day.isoformat()}")
    growth = 1.0 + 0.18 * (day - _GROWTH_EPOCH).days / 365.25
    products = list(PRODUCTS)
    weights = [share for share, _ in PRODUCTS.values()]
    rows: list[dict[str, Any]] = []
    for region, reps in REPS.items():
        for rep in reps:
            skill = 0.8 + 0.4 * random.Random(f"rep:{seed}:{rep}").random()
            lam = 0.6 * REGION_RATE[region] * _WEEKDAY_RATE[day.weekday()] * _MONTH_RATE[day.month - 1]
            closed: dict[str, list[float]] = {}
            for _ in range(_poisson(rng, lam * growth * skill)):
                product = rng.choices(products, weights)[0]
                size = PRODUCTS[product][1] * rng.lognormvariate(0.0, 0.35)
                closed.setdefault(product, []).append(size)
            for product, sizes in closed.items():
                rows.append({
                    "sale_date": day, "region": region, "product": product, "sales_rep": rep,
                    "deals_closed": len(sizes), "amount": Decimal(str(round(sum(sizes), 2))), "demo": True,
                })
    return rows


@dataclass(frozen=True)
class SeedResult:
    inserted: int
    first_date: date | None = None
    last_date: date | None = None
    skipped: str = ""


@asynccontextmanager
async def _transaction(target: Any) -> AsyncIterator[AsyncConnection]:
    """A transaction on an AsyncEngine, an async_sessionmaker or a parley Database."""
    if not isinstance(target, (AsyncEngine, async_sessionmaker)):
        target = getattr(target, "engine", target)  # a parley.runtime.db.Database
    if isinstance(target, AsyncEngine):
        async with target.begin() as conn:
            yield conn
    elif isinstance(target, async_sessionmaker):
        async with target() as session, session.begin():
            yield await session.connection()
    else:
        raise TypeError(f"expected an AsyncEngine or async_sessionmaker, got {type(target).__name__}")


async def seed_demo_data(
    target: Any,
    *,
    today: date | None = None,
    days: int = DEFAULT_DAYS,
    seed: int = DEFAULT_SEED,
    replace: bool = False,
    timezone: str = "UTC",
) -> SeedResult:
    """Fill `sales.daily_sales` with `days` days of demo sales ending `today`; idempotent.

    Only days that have no demo rows yet are generated, so running it again (e.g. at every
    start) inserts nothing or just the days since the last run. `replace` deletes the demo
    rows first. A table that holds non-demo rows is left alone (`skipped` says so).
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    today = today or today_in(timezone)
    first = today - timedelta(days=days - 1)
    c = daily_sales.c
    async with _transaction(target) as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SEED_LOCK})
        if await conn.scalar(select(exists().where(c.demo.is_(False)))):
            return SeedResult(0, skipped="sales.daily_sales holds non-demo data; demo data is not mixed in")
        if replace:
            await conn.execute(delete(daily_sales).where(c.demo.is_(True)))
        present = set(await conn.scalars(
            select(c.sale_date).distinct().where(c.demo.is_(True), c.sale_date >= first, c.sale_date <= today)
        ))
        rows = [
            row for n in range(days) if (day := first + timedelta(days=n)) not in present
            for row in demo_rows(day, seed)
        ]
        inserted = 0
        for i in range(0, len(rows), 5000):
            stmt = pg_insert(daily_sales).on_conflict_do_nothing(
                index_elements=["sale_date", "region", "product", "sales_rep"], index_where=c.demo
            ).returning(c.id)
            inserted += len((await conn.execute(stmt, rows[i : i + 5000])).all())
    return SeedResult(inserted, first, today)


async def seed_with_settings(settings: Settings, **options: Any) -> SeedResult:
    """`parley seed-sales`: migrate and seed the configured database (the embedded one if DATABASE_URL is
    unset; run it while `parley up` is stopped). `options` go to `seed_demo_data` (days, seed, replace, today)."""
    from parley.runtime.app import migrated_database

    async with migrated_database(settings) as database:
        return await seed_demo_data(database.engine, timezone=settings.tools.sales_timezone, **options)
