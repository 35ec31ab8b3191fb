"""sales_report: deals closed and revenue from the local sales database."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.tools.core import CallContext, Tool, ToolSpec
from services.tools.sales import GROUPINGS, METRICS, PERIODS, ReportQuery, sales_report, today_in

_FILTER = {"type": "string", "minLength": 1, "maxLength": 100}

SCHEMA = {
    "type": "object",
    "properties": {
        "period": {
            "type": "string",
            "enum": list(PERIODS),
            "description": (
                "Time window relative to today: today, yesterday, this_week, last_week, this_month, last_month, "
                "this_quarter, last_quarter, this_year, last_year, last_7_days, last_30_days; or custom with "
                "start_date and end_date."
            ),
        },
        "start_date": {"type": "string", "format": "date", "description": "First day, YYYY-MM-DD (custom only)."},
        "end_date": {"type": "string", "format": "date", "description": "Last day, YYYY-MM-DD (custom only)."},
        "group_by": {
            "type": "string",
            "enum": list(GROUPINGS),
            "default": "none",
            "description": "Break the figures down by region, product, sales_rep or month; none for one total.",
        },
        "metric": {
            "type": "string",
            "enum": list(METRICS),
            "default": "both",
            "description": "deals_closed (number of sales won), amount (revenue), or both.",
        },
        "region": {**_FILTER, "description": "Only this region, e.g. 'EMEA'."},
        "product": {**_FILTER, "description": "Only this product."},
        "sales_rep": {**_FILTER, "description": "Only this sales rep (full name)."},
    },
    "required": ["period"],
    "additionalProperties": False,
    "if": {"properties": {"period": {"const": "custom"}}, "required": ["period"]},
    "then": {"required": ["start_date", "end_date"]},
    "dependentSchemas": {
        "start_date": {"properties": {"period": {"const": "custom"}}},
        "end_date": {"properties": {"period": {"const": "custom"}}},
    },
}


class SalesReport(Tool):
    spec = ToolSpec(
        name="sales_report",
        description=(
            "Sales figures from the company's sales database: how many deals were closed (sales won) and the "
            "revenue (sales amount) in a period such as today, this week, last month, this quarter or last year, "
            "as one total or broken down by region, product, sales rep or month, optionally for one region, "
            "product or rep. Use it for questions like 'How many deals did we close last month?', 'How many "
            "sales did we make this week?', 'revenue by region this quarter', 'top sales reps this year' or "
            "'monthly sales trend'."
        ),
        parameters=SCHEMA,
        timeout_s=10.0,
    )

    def __init__(self, engine: AsyncEngine, timezone: str, currency: str) -> None:
        self._engine = engine
        self._timezone = timezone
        self._currency = currency

    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        query = ReportQuery(
            period=args["period"],
            group_by=args.get("group_by", "none"),
            metric=args.get("metric", "both"),
            start_date=date.fromisoformat(args["start_date"]) if "start_date" in args else None,
            end_date=date.fromisoformat(args["end_date"]) if "end_date" in args else None,
            region=args.get("region"),
            product=args.get("product"),
            sales_rep=args.get("sales_rep"),
        )
        return await sales_report(self._engine, query, today_in(self._timezone), self._currency)
