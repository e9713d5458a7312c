"""`from`/`to` and `range=` query parameters, read in the project's time zone."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from multidict import MultiMapping

from pulse.server.errors import ApiError
from pulse.storage.queries import Window

RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30), "90d": timedelta(days=90)}
DEFAULT_RANGE = "7d"


def _parse_bound(name: str, raw: str, tz: ZoneInfo, *, end: bool) -> int:
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            if end:  # a date as the end of a range includes that whole day
                day += timedelta(days=1)
            moment = datetime(day.year, day.month, day.day, tzinfo=tz)
        else:
            moment = datetime.fromisoformat(raw)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz)
    except ValueError:
        raise ApiError(
            400, f"{name}: expected an ISO date (2026-02-10) or datetime (2026-02-10T12:00:00Z), got {raw!r}",
            field=name,
        ) from None
    return int(moment.timestamp() * 1000)


def parse_window(query: MultiMapping[str], timezone: str, *, now_ms: int | None = None) -> Window:
    """The window a request asks for: `from`/`to`, or `range=24h|7d|30d|90d` ending now (default 7d)."""
    tz = ZoneInfo(timezone)
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if "from" in query or "to" in query:
        if "range" in query:
            raise ApiError(400, "range: give either range or from/to, not both", field="range")
        if "from" not in query:
            raise ApiError(400, "from: required when to is given", field="from")
        start = _parse_bound("from", query["from"], tz, end=False)
        end = _parse_bound("to", query["to"], tz, end=True) if "to" in query else now
        if end <= start:
            raise ApiError(400, "to: must be after from", field="to")
        return Window(start, end)
    name = query.get("range", DEFAULT_RANGE)
    span = RANGES.get(name)
    if span is None:
        raise ApiError(400, f"range: expected one of {', '.join(RANGES)}, got {name!r}", field="range")
    return Window(now - int(span.total_seconds() * 1000), now)
