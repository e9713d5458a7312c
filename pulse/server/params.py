"""Query parameters of the read API: the window, the filter grammar, limits, intervals.

Windows are read in the project's time zone. Bad values are 400s naming the parameter.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from multidict import MultiMapping

from pulse import timebounds
from pulse.server.errors import ApiError
from pulse.storage.model import Filters, Window

RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30), "90d": timedelta(days=90)}
DEFAULT_RANGE = "7d"

# Limits of the read API (README: Read API). They bound what one request can cost in time and memory:
# the work of a query grows with the days and buckets of its window, whatever the data.
MAX_WINDOW_DAYS = 400  # from/to; overview and timeseries also read the period before: 800 days in all
MAX_HOURLY_DAYS = 31  # interval=hour: at most 745 buckets
MAX_LIMIT = 1000  # rows of a breakdown or page of a list


def parse_bound(name: str, raw: str, tz: ZoneInfo, *, end: bool) -> int:
    """`from` or `to` in epoch ms (pulse.timebounds: dates from 1970 to 9999-12-30); a 400 naming it if bad."""
    try:
        return timebounds.parse_bound(name, raw, tz, end=end)
    except timebounds.BadBound as exc:
        raise ApiError(400, str(exc), field=exc.name) from None


def calendar_days(window: Window, tz: ZoneInfo) -> float:
    """The window's length in days of the zone's calendar (a day of 23 or 25 hours counts as one)."""
    start = datetime.fromtimestamp(window.start / 1000, tz=tz)
    end = datetime.fromtimestamp(window.end / 1000, tz=tz)
    return (end - start) / timedelta(days=1)  # one zone: wall-clock time, as a calendar counts


def reject_repeats(query: MultiMapping[str]) -> None:
    """A 400 naming a parameter given more than once: which of its values was meant is not for the server to
    guess (filters say the same in parse_filters)."""
    seen: set[str] = set()
    for key, _ in query.items():  # keys() gives each key once
        if key in SINGLE_PARAMS and key in seen:
            raise ApiError(400, f"{key}: given twice; it takes one value", field=key)
        seen.add(key)


def parse_window(query: MultiMapping[str], timezone: str, *, now_ms: int | None = None) -> Window:
    """The window a request asks for: `from`/`to`, or `range=24h|7d|30d|90d` ending now (default 7d). Every
    read with a window comes here first, so this is where a repeated parameter is refused."""
    reject_repeats(query)
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
        window = Window(start, end)
        days = calendar_days(window, tz)
        if days > MAX_WINDOW_DAYS:
            name = "to" if "to" in query else "from"
            raise ApiError(400, f"{name}: a window spans at most {MAX_WINDOW_DAYS} days, this one"
                                f" {math.ceil(days):,}; narrow from/to", field=name)
        return window
    name = query.get("range", DEFAULT_RANGE)
    span = RANGES.get(name)
    if span is None:
        raise ApiError(400, f"range: expected one of {', '.join(RANGES)}, got {name!r}", field="range")
    return Window(now - int(span.total_seconds() * 1000), now)


FILTER_PARAMS = ("event", "path", "referrer", "utm_source", "utm_medium", "utm_campaign", "browser", "os", "device",
                 "country", "language", "screen")
OTHER_PARAMS = {"from", "to", "range", "interval", "limit", "dimension", "token", "cursor"}
SINGLE_PARAMS = OTHER_PARAMS - {"token"}  # one value each (the token is the keyring's to judge)


def parse_filters(query: MultiMapping[str]) -> Filters:
    """`event=`, `path=`, `referrer=`, `utm_*=`, `browser=`, `os=`, `device=`, `country=`, `language=`, `screen=`,
    `prop.KEY=`, `trait.KEY=`; ANDed."""
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
    # stored as "GB" and "en", whatever the case asked for
    if "country" in values:
        values["country"] = values["country"].upper()
    if "language" in values:
        values["language"] = values["language"].lower()
    return Filters(**values, props=tuple(props), traits=tuple(traits))


def parse_limit(query: MultiMapping[str], default: int = 10) -> int:
    raw = query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, f"limit: expected a whole number from 1 to {MAX_LIMIT}, got {raw!r}", field="limit")
    return int(raw)


def parse_interval(query: MultiMapping[str], window: Window, timezone_name: str) -> str:
    interval = query.get("interval") or ("hour" if window.end - window.start <= 2 * 86_400_000 else "day")
    if interval not in ("hour", "day"):
        raise ApiError(400, f"interval: expected hour or day, got {interval!r}", field="interval")
    if interval == "hour" and calendar_days(window, ZoneInfo(timezone_name)) > MAX_HOURLY_DAYS:
        raise ApiError(400, f"interval: hourly buckets for at most {MAX_HOURLY_DAYS} days; use interval=day",
                       field="interval")
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
        try:
            edge = edge + timedelta(hours=1) if step is None else _next_midnight(edge, tz)
        except OverflowError:  # no day after the last one dates can hold: the window ends before it
            break
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
