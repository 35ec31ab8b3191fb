"""The sales database: periods, deterministic demo data, idempotent seeding, parameterised reports."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from parley.runtime.db import Database, migrate
from services.tools.core import ToolError
from services.tools.sales import (
    REPS,
    ReportQuery,
    demo_rows,
    resolve_period,
    sales_report,
    seed_demo_data,
    seed_with_settings,
)

TODAY = date(2026, 1, 15)  # a Thursday


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("today", "2026-01-15", "2026-01-15"),
        ("yesterday", "2026-01-14", "2026-01-14"),
        ("this_week", "2026-01-12", "2026-01-15"),
        ("last_week", "2026-01-05", "2026-01-11"),
        ("this_month", "2026-01-01", "2026-01-15"),
        ("last_month", "2025-12-01", "2025-12-31"),
        ("this_quarter", "2026-01-01", "2026-01-15"),
        ("last_quarter", "2025-10-01", "2025-12-31"),
        ("this_year", "2026-01-01", "2026-01-15"),
        ("last_year", "2025-01-01", "2025-12-31"),
        ("last_7_days", "2026-01-09", "2026-01-15"),
        ("last_30_days", "2025-12-17", "2026-01-15"),
    ],
)
def test_periods(period, start, end):
    assert resolve_period(period, TODAY) == (date.fromisoformat(start), date.fromisoformat(end))


def test_custom_period_is_checked():
    assert resolve_period("custom", TODAY, date(2025, 3, 1), date(2025, 3, 31)) == (date(2025, 3, 1), date(2025, 3, 31))
    with pytest.raises(ToolError, match="is before start_date"):
        resolve_period("custom", TODAY, date(2025, 3, 31), date(2025, 3, 1))
    with pytest.raises(ToolError, match="longer than 3660 days"):
        resolve_period("custom", TODAY, date(2000, 1, 1), date(2025, 1, 1))


def test_demo_rows_are_deterministic_and_realistic():
    day = date(2025, 11, 18)
    assert demo_rows(day) == demo_rows(day) and demo_rows(day) != demo_rows(day, seed=7)
    month = [row for n in range(30) for row in demo_rows(date(2025, 11, 1) + timedelta(days=n))]
    assert {r["region"] for r in month} == set(REPS)
    assert all(r["deals_closed"] >= 1 and r["amount"] > 0 and r["sales_rep"] in REPS[r["region"]] for r in month)
    weekend = sum(len(demo_rows(date(2025, 11, d))) for d in (1, 2, 8, 9))  # Sat/Sun
    weekdays = sum(len(demo_rows(date(2025, 11, d))) for d in (3, 4, 5, 6))
    assert weekend < weekdays


@pytest.fixture(scope="module")
async def db(database_url):
    await migrate(database_url)
    database = Database(database_url)
    yield database
    # Leave the full demo data behind for the other modules.
    await seed_demo_data(database.engine)
    await database.close()


async def test_seeding_is_idempotent_and_tops_up_new_days(db):
    first = await seed_demo_data(db.engine, today=TODAY - timedelta(days=10), days=30, replace=True)
    assert first.inserted == sum(len(demo_rows(first.first_date + timedelta(days=n))) for n in range(30))
    assert (await seed_demo_data(db.engine, today=TODAY - timedelta(days=10), days=30)).inserted == 0
    later = await seed_demo_data(db.sessions, today=TODAY, days=30)  # a sessionmaker works too (CLI path)
    assert later.inserted == sum(len(demo_rows(TODAY - timedelta(days=n))) for n in range(10))


async def test_seeding_never_mixes_demo_rows_into_real_data(db):
    async with db.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO sales.daily_sales (sale_date, region, product, sales_rep, deals_closed, amount) "
            "VALUES ('2026-01-02', 'EMEA', 'Widget', 'Real Person', 1, 10)"
        ))
    try:
        result = await seed_demo_data(async_sessionmaker(db.engine), today=TODAY)
        assert result.inserted == 0 and "non-demo data" in result.skipped
    finally:
        async with db.engine.begin() as conn:
            await conn.execute(text("DELETE FROM sales.daily_sales WHERE NOT demo"))


async def test_reports(db):
    await seed_demo_data(db.engine, today=TODAY, days=400, replace=True)
    by_region = await sales_report(db.engine, ReportQuery("last_month", "region"), TODAY)
    assert (by_region["start_date"], by_region["end_date"]) == ("2025-12-01", "2025-12-31")
    assert sum(r["deals_closed"] for r in by_region["rows"]) == by_region["totals"]["deals_closed"] > 0
    assert round(sum(r["amount"] for r in by_region["rows"]), 2) == by_region["totals"]["amount"]
    amounts = [r["amount"] for r in by_region["rows"]]
    assert amounts == sorted(amounts, reverse=True)  # biggest first

    months = await sales_report(db.engine, ReportQuery("last_year", "month", "amount"), TODAY)
    assert [r["month"] for r in months["rows"]] == [f"2025-{m:02d}" for m in range(1, 13)]
    assert set(months["totals"]) == {"amount"}

    emea = await sales_report(db.engine, ReportQuery("this_quarter", "sales_rep", "deals_closed", region="emea"),
                              TODAY)
    assert {r["sales_rep"] for r in emea["rows"]} <= set(REPS["EMEA"]) and emea["filters"] == {"region": "emea"}

    custom = await sales_report(
        db.engine, ReportQuery("custom", start_date=date(2025, 12, 1), end_date=date(2025, 12, 31)), TODAY
    )
    assert custom["totals"] == by_region["totals"]


async def test_filter_values_are_data_not_sql(db):
    hostile = await sales_report(db.engine, ReportQuery("last_year", region="EMEA' OR 1=1 --"), TODAY)
    assert hostile["totals"] == {"deals_closed": 0, "amount": 0.0}
    assert hostile["note"] == "no sales match the filters; known values: region: APAC, EMEA, LATAM, North America"


async def test_cli_entry_point_migrates_and_seeds(db, make_settings):
    result = await seed_with_settings(make_settings(), today=TODAY, days=5)
    assert result.first_date == TODAY - timedelta(days=4) and result.last_date == TODAY and not result.skipped
