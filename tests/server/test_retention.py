"""Retention against a recount, in plain Python, of the funnels' generated population (Asia/Kolkata days, weeks
from Monday, out-of-order arrival, persons who identify halfway, crawlers)."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tests.server.test_funnels import DAYS_WINDOW, FIRST_DAY, HOURS_WINDOW, TZ, bound, matches, population, shop

__all__ = ["population", "shop"]  # the fixtures, shared


def period_start(ms: int, period: str):
    day = datetime.fromtimestamp(ms / 1000, ZoneInfo(TZ)).date()
    return day - timedelta(days=day.weekday()) if period == "week" else day


def expected_retention(sent, period: str, periods: int, start_event, return_event, start: int, end: int,
                       filters: dict) -> list[dict]:
    """Per person, the period of their first start event ever; per cohort period of the window (widened to
    whole periods), who did a return event in that period and each of the next ones begun by now."""
    step = timedelta(days=7 if period == "week" else 1)
    today = datetime.now(ZoneInfo(TZ)).date()
    first: dict[int, object] = {}
    returns: dict[int, set] = {}
    for item in sent:
        if not matches(item, filters):
            continue
        when = period_start(item.ts, period)
        if start_event in (None, item.name):
            first[item.person] = min(first.get(item.person, when), when)
        if return_event in (None, item.name):
            returns.setdefault(item.person, set()).add(when)
    cohorts = []
    cohort = period_start(start, period)
    while datetime(cohort.year, cohort.month, cohort.day, tzinfo=ZoneInfo(TZ)).timestamp() * 1000 < end:
        people = [p for p, when in first.items() if when == cohort]
        returned = []
        for i in range(periods):
            when = cohort + i * step
            if when > today:
                break
            returned.append(sum(1 for p in people if when in returns.get(p, ())))
        cohorts.append({"start": datetime(cohort.year, cohort.month, cohort.day, tzinfo=ZoneInfo(TZ)).isoformat(),
                        "persons": len(people), "returned": returned})
        cohort += step
    return cohorts


CASES = [
    ("day", 8, None, None),
    ("day", 5, "signup", "purchase"),
    ("week", 3, "page_view", "purchase"),
    ("week", 8, None, "signup"),
    ("day", 3, "purchase", "purchase"),
]


@pytest.mark.parametrize("period, periods, start_event, return_event", CASES)
@pytest.mark.parametrize("filters", [{}, {"browser": "Chrome"}, {"trait.tier": "silver"}, {"prop.plan": "free"}])
async def test_retention_matches_a_recount(shop, population, period, periods, start_event, return_event, filters):
    params = {"period": period, "periods": str(periods), **filters}
    params.update({k: v for k, v in (("start_event", start_event), ("return_event", return_event)) if v})
    for start, end in (DAYS_WINDOW, HOURS_WINDOW):
        found = await shop("retention", **{"from": start, "to": end}, **params)
        expected = expected_retention(population[1], period, periods, start_event, return_event, bound(start),
                                      bound(end, True), filters)
        assert found["cohorts"] == expected
        assert found["period"] == period and found["from"] == expected[0]["start"]
    assert sum(c["persons"] for c in found["cohorts"]) > 0


async def test_first_start_counts_before_the_window(shop, population):
    """A person whose first event lies before the window is in no cohort of it, however active in it."""
    start = (FIRST_DAY + timedelta(days=10)).isoformat()
    found = await shop("retention", period="day", periods="2", **{"from": start, "to": DAYS_WINDOW[1]})
    expected = expected_retention(population[1], "day", 2, None, None, bound(start), bound(DAYS_WINDOW[1], True), {})
    assert found["cohorts"] == expected
    active = {i.person for i in population[1] if not i.bot and i.ts >= bound(start)}
    assert sum(c["persons"] for c in expected) < len(active)


async def test_periods_after_now_are_left_out(shop):
    today = datetime.now(ZoneInfo(TZ)).date()
    found = await shop("retention", period="day", periods="8",
                       **{"from": (today - timedelta(days=2)).isoformat(), "to": today.isoformat()})
    assert [len(c["returned"]) for c in found["cohorts"]] == [3, 2, 1]


@pytest.mark.parametrize("params, field", [
    ({"period": "month"}, "period"),
    ({"periods": "0"}, "periods"),
    ({"periods": "53"}, "periods"),
    ({"periods": "x"}, "periods"),
    ({"start_event": ""}, "start_event"),
    ({"browser": "A", "oops": "1"}, "oops"),
])
async def test_bad_parameters_are_400s_naming_them(shop, params, field):
    found = await shop("retention", 400, range="7d", **params)
    assert found["field"] == field and found["error"].startswith(f"{field}: ")
