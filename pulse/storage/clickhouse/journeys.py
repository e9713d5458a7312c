"""Funnels, retention and paths on the ClickHouse store, with the SQLite store's semantics
(`pulse.storage.sqlite.funnels`, `retention`, `paths`): the same walks, the same tie rules, the same answers.

Funnels and paths need each person's (or session's) matching events in time order. ClickHouse 18.16 has no
window functions, so ClickHouse selects and orders them (only the columns a walk needs, a step bit mask rather
than names) and the walk runs here, with the SQLite store's own code (`_walk`, `_steps`, `_answer`). Rows are
read in slices of persons (or sessions) by hash, each slice about CHUNK_ROWS rows, so memory holds one slice
whatever the window. A person's rows are on one shard (events are sharded by person), a session's may be on
two (an identify can start a new person inside a session): the ordered read through the Distributed table
merges them.

Events of the same millisecond: the SQLite store orders them as they were stored (event ids). A ClickHouse row
has no storage order (parts merge and sort by time only), so they are ordered by the time their batch was
received and then by uuid: the same order as SQLite's for events sent in batches received at different
milliseconds; inside one batch (or batches received in the same millisecond) it is the uuids' order, which
may differ from the order in the batch.

Retention is sets of persons per period: each person's first start event ever (over all the project's raw
events) and the periods of their return events, counted per (cohort, period) in ClickHouse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pulse.protocol import CohortCounts, FunnelGroup, FunnelStep, PathNode
from pulse.storage.clickhouse import breakdowns
from pulse.storage.clickhouse.filters import check_key, current_traits, raw_value, sqlite_text
from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import Filters, NotAvailable, Window
from pulse.storage.sqlite.funnels import _steps, _walk
from pulse.storage.sqlite.paths import _answer, _Node, add_session

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

CHUNK_ROWS = 200_000  # rows of one slice of persons or sessions read at once
STORED_ORDER = "ts, received, uuid"  # events of one millisecond: by their batch's arrival, then uuid
# a funnel breakdown's value of an event: its column, '' (not known) as NULL as SQLite's missing strings are
BREAKDOWN_COLUMNS = {"browser": "browser", "os": "os", "device": "device", "referrer": "nullIf(referrer_domain, '')",
                     "country": "nullIf(country, '')", "language": "nullIf(language, '')",
                     "screen": "nullIf(screen, '')"}
NO_VALUE = "CAST(NULL AS Nullable(String))"


def _as_is(person: object, value: str | None) -> str | None:
    return value


async def _breakdown_value(store: ClickHouseStore, project_id: int, breakdown: str | None, window: Window
                           ) -> tuple[str, Callable[[object, object], str | None]]:
    """The SQL of what an event gives for the breakdown, and how its value and person make the group's value
    as SQLite's `funnels.breakdown_value` reads it: a property as SQLite's CAST(json_extract(...) AS TEXT) of the
    stored JSON, a trait the person's current one, a UTM source its session's (of the session's first page
    view: NotAvailable when page views tie there with different sources, as the breakdowns)."""
    if breakdown is None:
        return NO_VALUE, _as_is
    if breakdown.startswith("prop."):
        check_key(breakdown[5:])
        return raw_value("props", breakdown[5:]), lambda person, raw: sqlite_text(raw) if raw else None
    if breakdown.startswith("trait."):
        check_key(breakdown[6:])
        traits = {person: sqlite_text(raw) for person, raw in await store.ch.select(
            f"SELECT person, value FROM ({current_traits(store, project_id)})"
            f" WHERE key = {sql_literal(breakdown[6:])}")}
        return NO_VALUE, lambda person, _: traits.get(person)
    if breakdown == "utm_source":
        await breakdowns.check_ties(store, project_id, window, "utm_source", first=True)
        sources = {session: source or None for session, source in await store.ch.select(
            f"SELECT session, argMinIfMerge(utm_source) FROM {store.t('sessions')} WHERE project_id = {project_id}"
            f" AND session GLOBAL IN (SELECT session FROM {store.t('events')} WHERE project_id = {project_id}"
            f" AND ts >= {window.start} AND ts < {window.end}) GROUP BY session")}
        return "session", lambda _, session: sources.get(session)
    if breakdown not in BREAKDOWN_COLUMNS:
        raise NotAvailable(f"a funnel broken down by {breakdown} is not available on the ClickHouse store")
    return BREAKDOWN_COLUMNS[breakdown], _as_is


def _is_step(name: str, path: str | None) -> str:
    """SQL: whether an event is the step (its name, and its path when the step names one)."""
    path_too = "" if path is None else f" AND path = {sql_literal(path)}"
    return f"(name = {sql_literal(name)}{path_too})"


def _edges(values: list[int]) -> str:
    return f"CAST({sql_literal([int(v) for v in values])} AS Array(Int64))"


async def _slices(store: ClickHouseStore, source: str, key: str, columns: str) -> list[str]:
    """SELECTs of `columns` from `source` (FROM … WHERE …), ordered by `key` then stored order, one per slice
    of `key`'s values by hash, each about CHUNK_ROWS rows."""
    rows = (await store.ch.select(f"SELECT count() {source}"))[0][0]
    slices = max(1, -(-rows // CHUNK_ROWS))
    order = f" ORDER BY {key}, {STORED_ORDER}"
    if slices == 1:
        return [f"SELECT {key}, {columns} {source}{order}"]
    return [f"SELECT {key}, {columns} {source} AND sipHash64({key}) % {slices} = {i}{order}" for i in range(slices)]


def _runs(rows: list[tuple]):
    """Consecutive rows of one key (the first column): (key, [rows without it])."""
    current, held = None, []
    for row in rows:
        if row[0] != current and held:
            yield current, held
            held = []
        current = row[0]
        held.append(row[1:])
    if held:
        yield current, held


async def funnel(store: ClickHouseStore, project_id: int, window: Window, filters: Filters,
                 steps: list[tuple[str, str | None]], names: list[str], window_ms: int, breakdown: str | None,
                 limit: int) -> tuple[list[FunnelStep], list[FunnelGroup] | None]:
    """As `pulse.storage.sqlite.funnels.funnel`: per person, from each first-step event the first event of each
    next step after the one before, no later than `window_ms` after the first; the furthest (earliest of
    equals) counts, and so does its first-step event's breakdown value."""
    where = store._conditions(project_id, filters)
    events = store.t("events")
    in_window = f"{where} AND ts >= {window.start} AND ts < {window.end}"
    value, group_of = await _breakdown_value(store, project_id, breakdown, window)
    any_step = " OR ".join(_is_step(name, path) for name, path in steps)
    mask = " + ".join(f"{_is_step(name, path)} * {1 << k}" for k, (name, path) in enumerate(steps))
    source = (f"FROM {events} WHERE {in_window} AND ({any_step}) AND person GLOBAL IN"
              f" (SELECT person FROM {events} WHERE {in_window} AND {_is_step(*steps[0])})")
    reached: list[list[float]] = [[] for _ in steps]
    groups: dict[str | None, list[list[float]]] = {}
    for query in await _slices(store, source, "person", f"ts, toUInt32({mask}), {value}"):
        for person, rows in _runs(await store.ch.select(query)):
            positions: list[list[int]] = [[] for _ in steps]
            for position, (_, bits, _) in enumerate(rows):
                for k in range(len(steps)):
                    if bits >> k & 1:
                        positions[k].append(position)
            if not positions[0]:
                continue
            count, chain = _walk([row[0] for row in rows], positions, window_ms)
            group = None
            if breakdown is not None:
                group = groups.setdefault(group_of(person, rows[chain[0]][2]), [[] for _ in steps])
            for k in range(count):
                seconds = (rows[chain[k]][0] - rows[chain[k - 1]][0]) / 1000 if k else 0.0
                reached[k].append(seconds)
                if group is not None:
                    group[k].append(seconds)
    if breakdown is None:
        return _steps(names, reached), None
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1][0]), item[0] is None, item[0] or ""))[:limit]
    return _steps(names, reached), [FunnelGroup(value=v, steps=_steps(names, counts)) for v, counts in ranked]


async def retention(store: ClickHouseStore, project_id: int, edges: list[int], cohorts: int, periods: int,
                    start_event: str | None, return_event: str | None, filters: Filters, now_ms: int
                    ) -> list[CohortCounts]:
    """As `pulse.storage.sqlite.retention.retention`: per cohort period [edges[c], edges[c + 1]) for c < `cohorts`,
    the persons whose first event matching the filters and `start_event` ever falls in it, and of them, per
    period after it (begun by `now_ms`, within `periods`), those with an event matching the filters and
    `return_event` in it."""
    where = store._conditions(project_id, filters)
    events = store.t("events")
    if not (await store.ch.select(f"SELECT count() FROM {events} WHERE project_id = {project_id}"))[0][0]:
        return [CohortCounts(0, [0] if edges[c] <= now_ms else []) for c in range(cohorts)]
    starts = "1" if start_event is None else f"name = {sql_literal(start_event)}"
    returns = "1" if return_event is None else f"name = {sql_literal(return_event)}"
    period_of = f"toInt64(arrayFirstIndex(x -> x > ts, {_edges(edges)})) - 2"  # -1 before the first edge
    # per person: the period of the first start ever (the periods only grow with time: the least one's) and
    # those with a return; per (cohort, period) the persons, the cohort's own size under period -1
    rows = await store.ch.select(
        f"SELECT c, q, count() FROM ("
        f" SELECT person, minIf({period_of}, {starts}) AS c, countIf({starts}) AS started,"
        f"  groupUniqArrayIf({period_of}, ({returns}) AND ts >= {edges[0]}) AS periods"
        f" FROM {events} WHERE {where} AND ts < {edges[-1]} AND (({starts}) OR (({returns}) AND ts >= {edges[0]}))"
        f" GROUP BY person HAVING started > 0 AND c >= 0 AND c < {cohorts})"
        f" ARRAY JOIN arrayConcat([toInt64(-1)], periods) AS q GROUP BY c, q")
    counts = {(c, q): n for c, q, n in rows}
    found = []
    for c in range(cohorts):
        if edges[c] > now_ms:
            found.append(CohortCounts(0, []))
            continue
        returned = []
        for q in range(c, min(c + periods, len(edges) - 1)):
            if edges[q] > now_ms:
                break
            returned.append(counts.get((c, q), 0))
        found.append(CohortCounts(counts.get((c, -1), 0), returned))
    return found


async def paths(store: ClickHouseStore, project_id: int, window: Window, filters: Filters,
                start: tuple[str, str | None], label: str, depth: int, limit: int) -> PathNode:
    """As `pulse.storage.sqlite.paths.paths`: each session holding `start` in the window (under the filters),
    from its first `start` on, its next steps in time order (a step repeated right after itself once), as a
    tree `depth` steps deep with `limit` next steps per step."""
    where = store._conditions(project_id, filters)
    events = store.t("events")
    in_window = f"{where} AND ts >= {window.start} AND ts < {window.end}"
    source = (f"FROM {events} WHERE {in_window} AND session GLOBAL IN"
              f" (SELECT session FROM {events} WHERE {in_window} AND {_is_step(*start)})")
    name, path = start
    root = _Node()
    for query in await _slices(store, source, "session", "name, nullIf(path, '')"):
        for _, rows in _runs(await store.ch.select(query)):
            add_session(root, rows, name, path, depth)
    return _answer(label, root, limit)
