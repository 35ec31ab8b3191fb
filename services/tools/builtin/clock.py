"""current_time: the date and time now, in a given IANA time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.tools.core import CallContext, Tool, ToolError, ToolSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "timezone": {
            "type": "string",
            "minLength": 1,
            "maxLength": 64,
            "pattern": r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$",
            "description": "IANA time zone, e.g. 'Europe/Paris', 'America/New_York' or 'UTC' (default).",
        }
    },
    "additionalProperties": False,
}


def now_in(timezone: str, now: datetime | None = None) -> dict[str, Any]:
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(
            f"unknown time zone {timezone!r}; use an IANA name such as 'Europe/Berlin' or 'Asia/Tokyo'"
        ) from None
    local = (now or datetime.now(UTC)).astimezone(zone)
    offset = local.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    return {
        "timezone": timezone,
        "iso": local.isoformat(timespec="seconds"),
        "date": local.date().isoformat(),
        "time": local.strftime("%H:%M:%S"),
        "weekday": local.strftime("%A"),
        "utc_offset": f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}",
        "abbreviation": local.tzname(),
        "unix_time": int(local.timestamp()),
    }


class CurrentTime(Tool):
    spec = ToolSpec(
        name="current_time",
        description=(
            "The current date, time and weekday, in a time zone (default UTC). Use it for 'what time is it', "
            "'what is today's date', 'what day of the week is it in Tokyo' and before reasoning about dates."
        ),
        parameters=SCHEMA,
        timeout_s=5.0,
    )

    async def run(self, args: dict[str, Any], call: CallContext) -> Any:
        return now_in(args.get("timezone", "UTC"))
