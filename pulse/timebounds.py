"""The ends of a time window as people write them: an ISO date (a whole day in a time zone) or a datetime.

The read API's `from`/`to` and `pulse export --from/--to` read them the same way and within the same years;
each says in its own terms which parameter was wrong (a 400 naming it, one line on stderr).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

FIRST_YEAR = 1970  # of a date or datetime given (in the project's time zone, or its own offset)
LAST_DAY = "9999-12-30"  # the end of this day in UTC is the latest moment: a date and time in every time zone
LATEST_MS = int(datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp() * 1000)


class BadBound(ValueError):
    """A bound that is not a date or datetime, or lies outside the years a window can cover."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def parse_bound(name: str, raw: str, tz: ZoneInfo, *, end: bool) -> int:
    """`name` (from or to) in epoch ms: a date (as an end, the end of that whole day in `tz`) or a datetime
    (without an offset: in `tz`)."""
    try:
        given: date = date.fromisoformat(raw) if len(raw) == 10 else datetime.fromisoformat(raw)
    except ValueError:
        raise BadBound(name, f"expected an ISO date (2026-02-10) or datetime (2026-02-10T12:00:00Z), got {raw!r}"
                       ) from None
    out_of_range = BadBound(name, f"{raw!r} is out of range: dates and times from {FIRST_YEAR} to {LAST_DAY} (UTC)")
    if given.year < FIRST_YEAR:
        raise out_of_range
    try:
        if isinstance(given, datetime):
            moment = given if given.tzinfo is not None else given.replace(tzinfo=tz)
        else:
            day = given + timedelta(days=1) if end else given  # a date as the end of a range includes that day
            moment = datetime(day.year, day.month, day.day, tzinfo=tz)
        ms = int(moment.timestamp() * 1000)
    except OverflowError:
        raise out_of_range from None
    if ms > LATEST_MS:
        raise out_of_range
    return ms
