"""Query parameters of the read API: the window, the filter grammar, limits, intervals.

Windows are read in the project's time zone. Bad values are 400s naming the parameter.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from multidict import MultiMapping

from pulse.server.errors import ApiError
from pulse.storage.model import Filters, Window

RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30), "90d": timedelta(days=90)}
DEFAULT_RANGE = "7d"


def parse_bound(name: str, raw: str, tz: ZoneInfo, *, end: bool) -> int:
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
        start = parse_bound("from", query["from"], tz, end=False)
        end = parse_bound("to", query["to"], tz, end=True) if "to" in query else now
        if end <= start:
            raise ApiError(400, "to: must be after from", field="to")
        return Window(start, end)
    name = query.get("range", DEFAULT_RANGE)
    span = RANGES.get(name)
    if span is None:
        raise ApiError(400, f"range: expected one of {', '.join(RANGES)}, got {name!r}", field="range")
    return Window(now - int(span.total_seconds() * 1000), now)


FILTER_PARAMS = ("event", "path", "referrer", "utm_source", "utm_medium", "utm_campaign", "browser", "os", "device")
OTHER_PARAMS = {"from", "to", "range", "interval", "limit", "dimension", "token", "cursor"}
MAX_LIMIT = 1000


def parse_filters(query: MultiMapping[str]) -> Filters:
    """`event=`, `path=`, `referrer=`, `utm_*=`, `browser=`, `os=`, `device=`, `prop.KEY=`, `trait.KEY=`; ANDed."""
    values: dict[str, str] = {}
    props: list[tuple[str, str]] = []
    traits: list[tuple[str, str]] = []
    for key, value in query.items():
        if key in FILTER_PARAMS:
            if key in values:
                raise ApiError(400, f"{key}: given twice; filters take one value each", field=key)
            values[key] = value
        elif key.startswith("prop.") and len(key) > 5:
            props.append((key[5:], value))
        elif key.startswith("trait.") and len(key) > 6:
            traits.append((key[6:], value))
        elif key not in OTHER_PARAMS:
            raise ApiError(400, f"{key}: unknown parameter (filters are {', '.join(FILTER_PARAMS)},"
                                " prop.KEY and trait.KEY)", field=key)
    return Filters(**values, props=tuple(props), traits=tuple(traits))


def parse_limit(query: MultiMapping[str], default: int = 10) -> int:
    raw = query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, f"limit: expected a whole number from 1 to {MAX_LIMIT}, got {raw!r}", field="limit")
    return int(raw)


def parse_interval(query: MultiMapping[str], window: Window) -> str:
    interval = query.get("interval") or ("hour" if window.end - window.start <= 2 * 86_400_000 else "day")
    if interval not in ("hour", "day"):
        raise ApiError(400, f"interval: expected hour or day, got {interval!r}", field="interval")
    if interval == "hour" and window.end - window.start > 31 * 86_400_000:
        raise ApiError(400, "interval: hourly buckets for at most 31 days; use interval=day", field="interval")
    return interval


def bucket_bounds(window: Window, interval: str, timezone_name: str) -> list[int]:
    """Bucket edges in ms: aligned to whole hours or to midnights of the time zone, clipped to the window."""
    tz = ZoneInfo(timezone_name)
    local = datetime.fromtimestamp(window.start / 1000, tz=tz)
    if interval == "hour":  # the zone's hours (at :30 UTC in India), a fixed hour apart
        edge = local.replace(minute=0, second=0, microsecond=0).astimezone(timezone.utc)
        step = None
    else:
        edge = datetime(local.year, local.month, local.day, tzinfo=tz)
        step = timedelta(days=1)
    bounds = [window.start]
    while True:
        edge = edge + timedelta(hours=1) if step is None else _next_midnight(edge, tz)
        ms = int(edge.timestamp() * 1000)
        if ms >= window.end:
            break
        if ms > window.start:
            bounds.append(ms)
    bounds.append(window.end)
    return bounds


def _next_midnight(edge: datetime, tz: ZoneInfo) -> datetime:
    day = (edge.astimezone(tz) + timedelta(hours=25)).date()  # past any 23- or 25-hour day
    return datetime(day.year, day.month, day.day, tzinfo=tz)


def iso(ms: int, timezone_name: str) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=ZoneInfo(timezone_name)).isoformat()
