"""Goals: the ones an operator declares per project (table `goals`), and what every goal reached in a window.

A goal is a custom event name (any event but `page_view` and the `$` ones, listed whether declared or not),
or a page-view path declared with `pulse goals add` (`/thank-you`; a trailing `*` matches a prefix,
`/blog/*`). Its events and visitors come from the same pieces as `top-events` and `pages`, so the numbers
agree; its revenue from one scan of the raw events that carry a numeric `revenue` or `amount` property, kept
per whole day in the day cache. When the server has event columns, all of it is counted from the window's
matching events in them instead, and the revenue read by id from the few that have such a property.
"""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal

import apsw
import numpy as np

from pulse.protocol import GoalRow, Revenue
from pulse.storage.model import PAGE_VIEW, Filters, Project, ProjectError, Window, now_ms
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.aggregates import Totals
from pulse.storage.sqlite.breakdowns import event_values
from pulse.storage.sqlite.column_scans import Matched
from pulse.storage.sqlite.connection import immediate
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.digests import totals_and_names
from pulse.storage.sqlite.scans import cached_scans, scan_sql, strings

MAX_GOALS = 100  # per project
MAX_GOAL_CHARS = 200  # as an event name
RATE_DIGITS = 4  # conversion rates are rounded as bounce rates are
PREFIX = "*"  # at the end of a path goal: every path that starts with what comes before


# -- the declared goals -------------------------------------------------------------------------------


def goal_kind(goal: str) -> str:
    """A goal's kind: "page" for a path, "event" for an event name."""
    return "page" if goal.startswith("/") else "event"


def check_goal(goal: str) -> str:
    """The goal as stored, or a ProjectError saying why it cannot be one."""
    if not goal or len(goal) > MAX_GOAL_CHARS:
        raise ProjectError(f"a goal is 1-{MAX_GOAL_CHARS} characters, got {len(goal)}")
    if goal != goal.strip() or any(ord(c) < 32 or ord(c) == 127 for c in goal):
        raise ProjectError(f"goal {goal!r}: no control characters, nor spaces at either end")
    if goal_kind(goal) == "page":
        if any(c.isspace() for c in goal) or PREFIX in goal[:-1]:
            raise ProjectError(f"goal {goal!r}: a path goal is a path without spaces, with {PREFIX!r} only at its"
                               " end (/blog/*)")
    elif goal == PAGE_VIEW or goal.startswith("$"):
        raise ProjectError(f"goal {goal!r} is not a goal: page views are goals by their path (/thank-you), and"
                           " $ events are pulse's own; give a path starting with / or a custom event name")
    return goal


def list_goals(conn: apsw.Connection, project: Project) -> list[dict[str, object]]:
    return [{"goal": goal, "kind": goal_kind(goal), "created_at": created}
            for goal, created in conn.execute("SELECT goal, created_at FROM goals WHERE project_id = ? ORDER BY goal",
                                              (project.id,))]


def add_goal(conn: apsw.Connection, project: Project, goal: str) -> dict[str, object]:
    check_goal(goal)
    with immediate(conn):
        if conn.execute("SELECT 1 FROM goals WHERE project_id = ? AND goal = ?", (project.id, goal)).fetchone():
            raise ProjectError(f"project {project.name!r} already has the goal {goal!r}")
        if conn.execute("SELECT count(*) FROM goals WHERE project_id = ?", (project.id,)).fetchone()[0] >= MAX_GOALS:
            raise ProjectError(f"project {project.name!r} has {MAX_GOALS} goals, the most it may have; remove one"
                               " first")
        created = now_ms()
        conn.execute("INSERT INTO goals(project_id, goal, created_at) VALUES (?, ?, ?)", (project.id, goal, created))
    return {"goal": goal, "kind": goal_kind(goal), "created_at": created}


def remove_goal(conn: apsw.Connection, project: Project, goal: str) -> None:
    with immediate(conn):
        if not conn.execute("SELECT 1 FROM goals WHERE project_id = ? AND goal = ?", (project.id, goal)).fetchone():
            raise ProjectError(f"project {project.name!r} has no goal {goal!r}")
        conn.execute("DELETE FROM goals WHERE project_id = ? AND goal = ?", (project.id, goal))


# -- what the goals reached ---------------------------------------------------------------------------

# a number, never text: `revenue`, else `amount`; the currency when it is text
_REVENUE = (
    "SELECT e.name_id, e.path_id,"
    " CASE WHEN json_type(e.props, '$.revenue') IN ('integer', 'real') THEN json_extract(e.props, '$.revenue')"
    " WHEN json_type(e.props, '$.amount') IN ('integer', 'real') THEN json_extract(e.props, '$.amount') END AS amount,"
    " CASE WHEN json_type(e.props, '$.currency') = 'text' THEN json_extract(e.props, '$.currency') END"
    " {source} WHERE {where} AND e.props IS NOT NULL AND amount IS NOT NULL"
)

_AMOUNTS = ("revenue", "amount")  # the properties _REVENUE reads an amount from
Earned = dict[tuple[str, str | None], dict[str | None, Decimal]]  # (event, path of a page view) -> currency -> sum


def _earned(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters) -> Earned:
    """Revenue of the events of [start, end) that match the filters, by event name (and path, for page
    views) and currency."""
    source, where, params = scan_sql(snap, project_id, start, end, filters)
    return _summed(snap, _REVENUE.format(source=source, where=where), params)


def _summed(snap: Snapshot, sql: str, params: list) -> Earned:
    """The revenue of the rows of a _REVENUE query, by event name (and path, for page views) and currency.
    Sums are decimal, so they do not depend on the order they are added in."""
    rows = list(snap.conn.execute(sql, params))
    named = strings(snap, {name for name, _, _, _ in rows} | {path for _, path, _, _ in rows if path is not None})
    found: Earned = {}
    for name_id, path_id, amount, currency in rows:
        name = named[name_id]
        key = (name, named.get(path_id) if name == PAGE_VIEW else None)
        sums = found.setdefault(key, defaultdict(Decimal))
        sums[None if currency is None else currency.upper()] += Decimal(str(amount))
    return {key: dict(sums) for key, sums in found.items()}


def earned(snap: Snapshot, project_id: int, window: Window, filters: Filters) -> Earned:
    """Revenue over the window in one pass: whole days and hours from the day cache (for filters it can
    hold), the rest scanned now."""
    hours, raw = window.split()
    parts: list[Earned] = []
    if hours is not None:
        parts += cached_scans(snap, project_id, hours, filters, ("revenue",),
                              lambda start, end: _earned(snap, project_id, start, end, filters))
    parts += (_earned(snap, project_id, start, end, filters) for start, end in raw)
    found: Earned = defaultdict(lambda: defaultdict(Decimal))
    for part in parts:
        for key, sums in part.items():
            for currency, amount in sums.items():
                found[key][currency] += amount
    return found


def matches(goal: str, path: str) -> bool:
    if goal.endswith(PREFIX):
        return path.startswith(goal[:-1])
    return path == goal


def _revenue(sums: dict[str | None, Decimal]) -> list[Revenue]:
    return [Revenue(currency, float(amount))
            for currency, amount in sorted(sums.items(), key=lambda item: (item[0] is None, item[0] or ""))]


def goals(snap: Snapshot, project_id: int, window: Window, filters: Filters, limit: int
          ) -> tuple[int, list[GoalRow]]:
    """Every visitor of the window under the filters, and per goal its visitors, events, conversion rate and
    revenue: every custom event seen, and every goal declared (zeros when it was not reached)."""
    declared = [goal for (goal,) in snap.conn.execute("SELECT goal FROM goals WHERE project_id = ?", (project_id,))]
    paths = [goal for goal in declared if goal_kind(goal) == "page"]
    found = column_scans.matched(snap, project_id, window.start, window.end, filters)
    if found is not None:
        visitors, names, pages, money = _from_columns(snap, found, paths)
    else:
        visitors, names, pages, money = _from_table(snap, project_id, window, filters, paths)
    reached: dict[str, tuple[str, Reached, dict[str | None, Decimal]]] = {}
    for name, counted in names.items():
        if name != PAGE_VIEW and not name.startswith("$"):
            reached[name] = ("event", counted, money.get((name, None), {}))
    for goal in declared:
        if goal_kind(goal) == "event":
            reached.setdefault(goal, ("event", (0, 0), {}))
            continue
        sums: dict[str | None, Decimal] = defaultdict(Decimal)
        for (name, path), part in money.items():
            if name == PAGE_VIEW and path is not None and matches(goal, path):
                for currency, amount in part.items():
                    sums[currency] += amount
        reached[goal] = ("page", pages[goal], sums)
    rows = [GoalRow(goal=goal, kind=kind, visitors=users, events=events,
                    conversion_rate=round(users / visitors, RATE_DIGITS) if visitors else 0.0,
                    revenue=_revenue(sums))
            for goal, (kind, (events, users), sums) in reached.items()]
    rows.sort(key=lambda row: (-row.visitors, row.goal))
    return visitors, rows[:limit]


Reached = tuple[int, int]  # events, visitors


def _from_table(snap: Snapshot, project_id: int, window: Window, filters: Filters, paths: list[str]
                ) -> tuple[int, dict[str, Reached], dict[str, Reached], Earned]:
    """What goals() counts (the visitors; per event name; per path goal; the revenue), from the rollups, the
    day cache and raw events."""
    total, names = totals_and_names(snap, project_id, window, filters)
    pages = event_values(snap, project_id, window, filters, "pages") if paths else {}
    reached = {}
    for goal in paths:
        found = Totals()
        for path, part in pages.items():
            if matches(goal, path):
                found.add(part)
        reached[goal] = (found.events, len(found.users))
    return (len(total.users), {name: (part.events, len(part.users)) for name, part in names.items()}, reached,
            earned(snap, project_id, window, filters))


PAIR_CELLS = 1 << 26  # the most cells of one table of (goal, person) pairs seen: 64 MiB


def _from_columns(snap: Snapshot, found: Matched, paths: list[str]
                  ) -> tuple[int, dict[str, Reached], dict[str, Reached], Earned]:
    """What goals() counts, from the matching events of the event columns: the visitors; per custom event name
    and per path goal, events and visitors; and the revenue, read by id from the few events that have a
    `revenue` or `amount` property (whether it is a number is the table's to say)."""
    if not len(found):
        return 0, {}, {goal: (0, 0) for goal in paths}, {}
    parts = [(segment.at("name", rows), segment.at("person", rows)) for segment, rows in found.parts]
    top = max(int(persons.max()) for _, persons in parts)
    per_name = np.zeros(0, dtype=np.int64)
    for names, _ in parts:
        counted = np.bincount(names)
        per_name = np.pad(per_name, (0, max(0, len(counted) - len(per_name))))
        per_name[:len(counted)] += counted
    present = np.flatnonzero(per_name)
    code_of = np.zeros(len(per_name), dtype=np.int64)
    code_of[present] = np.arange(len(present))
    users, visitors = _visitors([(code_of[names], persons) for names, persons in parts], len(present), top)
    named = strings(snap, present.tolist())
    by_name = {named[i]: (int(per_name[i]), int(users[code])) for code, i in enumerate(present.tolist())}
    by_path = {goal: (0, 0) for goal in paths}
    viewed_id = next((i for i, name in named.items() if name == PAGE_VIEW), None)
    if paths and viewed_id is not None:
        views = []
        for (names, persons), (segment, rows) in zip(parts, found.parts):
            page_paths = segment.at("path", rows)
            viewed = (names == viewed_id) & (page_paths > 0)
            views.append((page_paths[viewed], persons[viewed]))
        viewed_paths = np.concatenate([viewed for viewed, _ in views])
        path_names = strings(snap, np.flatnonzero(np.bincount(viewed_paths)).tolist())
        for goal in paths:
            hits = np.zeros(max(path_names, default=0) + 1, dtype=bool)
            hits[[i for i, path in path_names.items() if matches(goal, path)]] = True
            coded = [(np.zeros(np.count_nonzero(keep), dtype=np.int64), persons[keep])
                     for keep, persons in ((hits[page_paths], persons) for page_paths, persons in views)]
            by_path[goal] = (sum(len(codes) for codes, _ in coded), _visitors(coded, 1, top)[1])
    paying = np.unique(np.concatenate([found.prop(key)[0] for key in _AMOUNTS]))
    money: Earned = {}
    if len(paying):
        money = _summed(snap, _REVENUE.format(source="FROM events e", where="e.id IN (SELECT value FROM json_each(?))"),
                        [json.dumps(_ids_at(found, paying))])
    return visitors, by_name, by_path, money


def _visitors(coded: list[tuple[np.ndarray, np.ndarray]], codes: int, top: int) -> tuple[np.ndarray, int]:
    """Distinct persons per code 0..codes-1 of (codes, persons) arrays, and in all: each pair marked in a table
    of codes by persons, as many codes at a time as PAIR_CELLS allows."""
    found = np.zeros(codes, dtype=np.int64)
    width = top + 1
    anyone = np.zeros(width, dtype=bool)
    step = max(1, PAIR_CELLS // width)
    for first in range(0, codes, step):
        last = min(codes, first + step)
        seen = np.zeros((last - first) * width, dtype=bool)
        for code, persons in coded:
            if first > 0 or last < codes:
                keep = (code >= first) & (code < last)
                code, persons = code[keep] - first, persons[keep]
            pairs = code * width
            pairs += persons
            seen[pairs] = True
        table = seen.reshape(last - first, width)
        found[first:last] = np.count_nonzero(table, axis=1)
        anyone |= table.any(axis=0)
    return found, int(np.count_nonzero(anyone))


def _ids_at(found: Matched, indexes: np.ndarray) -> list[int]:
    """The event ids of some of the matching events, by their (ascending) indexes among them."""
    ids = []
    offset = 0
    for segment, rows in found.parts:
        inside = indexes[(indexes >= offset) & (indexes < offset + len(rows))] - offset
        ids += segment.cols["id"][rows[inside]].tolist()
        offset += len(rows)
    return ids
