"""What the goals reached on the ClickHouse store, with the SQLite store's meaning (`sqlite/goals.py`).

Custom events come from the same totals per event name as top events (the hourly rollups over whole hours,
when nothing but the event name is filtered); declared path goals from one pass over the window's page views
that counts, per goal, the views whose path matches and their distinct persons; revenue from the events whose
properties name `revenue` or `amount`, read back and summed here as decimals, each amount taken as SQLite's
JSON functions take it (a number only, `revenue` before `amount`; an integer beyond 64 bits as a float), so
the sums are SQLite's to the last digit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal
from typing import TYPE_CHECKING

from pulse.protocol import GoalRow
from pulse.storage.model import PAGE_VIEW, Filters, Window
from pulse.storage.sqlite.goals import PREFIX, RATE_DIGITS, _revenue, goal_kind, matches
from pulse.storage.clickhouse.transport import sql_literal

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

INT64 = (-(2 ** 63), 2 ** 63)  # SQLite's JSON integers; larger ones it reads as floats
AMOUNT_KEYS = ("revenue", "amount")  # the first that holds a number is the amount

Sums = dict[str | None, Decimal]  # currency -> sum


def _path_match(goal: str) -> str:
    """A condition over `path` that is `matches(goal, path)`: byte prefixes of UTF-8 are prefixes of the text."""
    if goal.endswith(PREFIX):
        prefix = goal[:-1]
        return f"substring(path, 1, {len(prefix.encode())}) = {sql_literal(prefix)}"
    return f"path = {sql_literal(goal)}"


async def _page_goals(store: ClickHouseStore, project_id: int, window: Window, filters: Filters,
                      goals: list[str]) -> list[tuple[int, int]]:
    """(page views, persons) per path goal, in the order given."""
    columns = ", ".join(f"countIf({_path_match(goal)}), uniqExactIf(person, {_path_match(goal)})" for goal in goals)
    row = (await store.ch.select(
        f"SELECT {columns} FROM {store.t('events')} WHERE {store._conditions(project_id, filters)}"
        f" AND ts >= {window.start} AND ts < {window.end} AND page = 1 AND path != ''"))[0]
    return [(row[2 * i], row[2 * i + 1]) for i in range(len(goals))]


def _amount(props: str) -> tuple[Decimal, str | None] | None:
    """The event's amount and upper-cased currency, as SQLite's json_type/json_extract read them, or None."""
    found = json.loads(props)
    if not isinstance(found, dict):
        return None
    for key in AMOUNT_KEYS:
        value = found.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, int) and not INT64[0] <= value < INT64[1]:
            value = float(value)
        currency = found.get("currency")
        return Decimal(str(value)), currency.upper() if isinstance(currency, str) else None
    return None


async def _earned(store: ClickHouseStore, project_id: int, window: Window, filters: Filters
                  ) -> dict[tuple[str, str | None], Sums]:
    """Revenue of the window's events that match the filters, by event name (and path, for page views) and
    currency."""
    named = " OR ".join(f"position(props, {sql_literal(json.dumps(key))}) > 0" for key in AMOUNT_KEYS)
    rows = await store.ch.select(
        f"SELECT name, path, props FROM {store.t('events')} WHERE {store._conditions(project_id, filters)}"
        f" AND ts >= {window.start} AND ts < {window.end} AND props != '' AND ({named})")
    found: dict[tuple[str, str | None], Sums] = {}
    for name, path, props in rows:
        amount = _amount(props)
        if amount is None:
            continue
        key = (name, (path or None) if name == PAGE_VIEW else None)
        sums = found.setdefault(key, defaultdict(Decimal))
        sums[amount[1]] += amount[0]
    return found


async def goals(store: ClickHouseStore, project_id: int, window: Window, filters: Filters, limit: int
                ) -> tuple[int, list[GoalRow]]:
    """Every visitor of the window under the filters, and per goal its visitors, events, conversion rate and
    revenue: every custom event seen, and every goal declared (zeros when it was not reached)."""
    declared = [goal for goal, _, _ in await store._goals(project_id)]
    total = await store._totals(project_id, window, filters, None)
    names = await store._totals(project_id, window, filters, "name")
    paths = [goal for goal in declared if goal_kind(goal) == "page"]
    pages = dict(zip(paths, await _page_goals(store, project_id, window, filters, paths))) if paths else {}
    money = await _earned(store, project_id, window, filters)
    reached: dict[str, tuple[str, int, int, Sums]] = {}  # goal -> (kind, visitors, events, revenue)
    for name, events, users, _ in names:
        if name != PAGE_VIEW and not name.startswith("$"):
            reached[name] = ("event", users, events, money.get((name, None), {}))
    for goal in declared:
        if goal_kind(goal) == "event":
            reached.setdefault(goal, ("event", 0, 0, {}))
            continue
        sums: Sums = defaultdict(Decimal)
        for (name, path), part in money.items():
            if name == PAGE_VIEW and path is not None and matches(goal, path):
                for currency, amount in part.items():
                    sums[currency] += amount
        events, users = pages[goal]
        reached[goal] = ("page", users, events, sums)
    visitors = total[0][2] if total else 0
    rows = [GoalRow(goal=goal, kind=kind, visitors=users, events=events,
                    conversion_rate=round(users / visitors, RATE_DIGITS) if visitors else 0.0,
                    revenue=_revenue(sums))
            for goal, (kind, users, events, sums) in reached.items()]
    rows.sort(key=lambda row: (-row.visitors, row.goal))
    return visitors, rows[:limit]
