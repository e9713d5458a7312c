"""Goals: the ones an operator declares per project (table `goals`), and what every goal reached in a window.

A goal is a custom event name (any event but `page_view` and the `$` ones, listed whether declared or not),
or a page-view path declared with `pulse goals add` (`/thank-you`; a trailing `*` matches a prefix,
`/blog/*`). Its events and visitors come from the same pieces as `top-events` and `pages`, so the numbers
agree; its revenue from one scan of the raw events that carry a numeric `revenue` or `amount` property, kept
per whole day in the day cache.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

import apsw

from pulse.protocol import GoalRow, Revenue
from pulse.storage.model import PAGE_VIEW, Filters, Project, ProjectError, Window, now_ms
from pulse.storage.sqlite.aggregates import Totals
from pulse.storage.sqlite.breakdowns import event_values
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

Earned = dict[tuple[str, str | None], dict[str | None, Decimal]]  # (event, path of a page view) -> currency -> sum


def _earned(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters) -> Earned:
    """Revenue of the events of [start, end) that match the filters, by event name (and path, for page
    views) and currency. Sums are decimal, so they do not depend on the order they are added in."""
    source, where, params = scan_sql(snap, project_id, start, end, filters)
    rows = list(snap.conn.execute(_REVENUE.format(source=source, where=where), params))
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
    if hours is not None and filters.by_hour:
        parts += cached_scans(snap, project_id, hours, filters, ("revenue",),
                              lambda start, end: _earned(snap, project_id, start, end, filters))
    elif hours is not None:
        raw = [(window.start, window.end)]
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
    total, names = totals_and_names(snap, project_id, window, filters)
    paths = [goal for goal in declared if goal_kind(goal) == "page"]
    pages = event_values(snap, project_id, window, filters, "pages") if paths else {}
    money = earned(snap, project_id, window, filters)
    reached: dict[str, tuple[str, Totals, dict[str | None, Decimal]]] = {}
    for name, found in names.items():
        if name != PAGE_VIEW and not name.startswith("$"):
            reached[name] = ("event", found, money.get((name, None), {}))
    for goal in declared:
        if goal_kind(goal) == "event":
            reached.setdefault(goal, ("event", Totals(), {}))
            continue
        found = Totals()
        for path, part in pages.items():
            if matches(goal, path):
                found.add(part)
        sums: dict[str | None, Decimal] = defaultdict(Decimal)
        for (name, path), part in money.items():
            if name == PAGE_VIEW and path is not None and matches(goal, path):
                for currency, amount in part.items():
                    sums[currency] += amount
        reached[goal] = ("page", found, sums)
    visitors = len(total.users)
    rows = [GoalRow(goal=goal, kind=kind, visitors=len(found.users), events=found.events,
                    conversion_rate=round(len(found.users) / visitors, RATE_DIGITS) if visitors else 0.0,
                    revenue=_revenue(sums))
            for goal, (kind, found, sums) in reached.items()]
    rows.sort(key=lambda row: (-row.visitors, row.goal))
    return visitors, rows[:limit]
