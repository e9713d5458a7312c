"""The numbers of a period on the ClickHouse store: the overview of a window and of the one before it, events,
users and sessions per time bucket, and the session sums behind bounce rate, duration and pages per session.

Each bucket [start, end) is cut into whole UTC days, whole hours beside them and raw milliseconds at its edges
(`plan`). Events are counted from `hourly` (a count per hour and name is small whatever the traffic). Persons
and sessions are exact sets (`uniqExactState`), and sets merge exactly, so a bucket's uniques are the union of
`people_daily`'s sets of its whole days, `people_hourly`'s of its other whole hours and a raw scan of its
edges; with an event filter, `hourly`'s sets of that name for every whole hour. Reading a month of per-day sets
of every name at once holds each person about once per day, where `hourly`'s per-name sets hold it once per
hour and name it was seen in. Other filters are answered from raw events, as before.

A session's numbers need all its events, so they come from the `sessions` rollup, grouped only over the
sessions `session_starts` names for the window's hours (the hour of a session's earliest event is among them
when it started in the window), never over every session the project had.

The three tables are filled by materialized views from the moment they exist; what was stored before is
copied in once per shard at connect (`backfill`, marked done in `backfills`). A row both copied and written by
a view is in a set twice, which changes no union, and a spare `session_starts` row only names a session that
the `sessions` rollup then leaves out, so the copy may overlap the views and may run again after a failure.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pulse.protocol import Counts, PeriodStats, TopEvent
from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import DAY_MS, HOUR_MS, Filters, Window
from pulse.storage.sqlite.sessions import session_stats

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

BACKFILL = "periods"  # the row in `backfills` once a shard's period tables hold what was stored before them
HOURS_PER_DAY = DAY_MS // HOUR_MS


async def backfill(store: ClickHouseStore) -> None:
    """On each shard without its `backfills` row: the period tables gain what `hourly` and `sessions` held
    before they existed; then the row is written."""
    db = store.db
    for transport in store.transports:
        done = await transport.select(f"SELECT count() FROM {db}.backfills WHERE name = {sql_literal(BACKFILL)}")
        if done[0][0]:
            continue
        await transport.execute(
            f"INSERT INTO {db}.people_hourly SELECT project_id, bot, hour, uniqExactMergeState(users),"
            f" uniqExactMergeState(sessions) FROM {db}.hourly GROUP BY project_id, bot, hour")
        await transport.execute(
            f"INSERT INTO {db}.people_daily SELECT project_id, bot, toUInt32(intDiv(hour, {HOURS_PER_DAY})) AS day,"
            f" uniqExactMergeState(users), uniqExactMergeState(sessions) FROM {db}.hourly GROUP BY project_id, bot, day")
        await transport.execute(
            f"INSERT INTO {db}.session_starts SELECT project_id, toUInt32(intDiv(minMerge(first), {HOUR_MS})),"
            f" session FROM {db}.sessions GROUP BY project_id, session")
        await transport.execute(f"INSERT INTO {db}.backfills VALUES ({sql_literal(BACKFILL)}, {time.time_ns()})")


@dataclass
class Plan:
    """Buckets cut for the rollups: (day, bucket) of whole UTC days, (hour, bucket) of the other whole hours,
    and the raw millisecond pieces left."""

    days: list[tuple[int, int]] = field(default_factory=list)
    hours: list[tuple[int, int]] = field(default_factory=list)
    raw: list[tuple[int, int]] = field(default_factory=list)

    @property
    def all_hours(self) -> list[tuple[int, int]]:
        """Every whole hour with its bucket, those of the whole days included."""
        spread = [(day * HOURS_PER_DAY + i, bucket) for day, bucket in self.days for i in range(HOURS_PER_DAY)]
        return sorted(self.hours + spread)


def plan(bounds: list[int], rollups: bool) -> Plan:
    """Buckets [bounds[i], bounds[i + 1]) cut into whole days, whole hours and raw pieces (all raw without
    `rollups`)."""
    found = Plan()
    if not rollups:
        found.raw = [(bounds[0], bounds[-1])] if bounds[0] < bounds[-1] else []
        return found
    for bucket, (start, end) in enumerate(zip(bounds, bounds[1:])):
        first_hour, last_hour = -(-start // HOUR_MS), end // HOUR_MS
        if first_hour >= last_hour:
            if start < end:
                found.raw.append((start, end))
            continue
        if start < first_hour * HOUR_MS:
            found.raw.append((start, first_hour * HOUR_MS))
        if last_hour * HOUR_MS < end:
            found.raw.append((last_hour * HOUR_MS, end))
        first_day, last_day = -(-first_hour // HOURS_PER_DAY), last_hour // HOURS_PER_DAY
        if first_day >= last_day:
            found.hours += [(hour, bucket) for hour in range(first_hour, last_hour)]
            continue
        found.hours += [(hour, bucket) for hour in range(first_hour, first_day * HOURS_PER_DAY)]
        found.days += [(day, bucket) for day in range(first_day, last_day)]
        found.hours += [(hour, bucket) for hour in range(last_day * HOURS_PER_DAY, last_hour)]
    return found


def _key(column: str, pairs: list[tuple[int, int]], single: bool) -> str:
    """SQL: the bucket of `column`'s value (a day or an hour) as listed in `pairs`, -1 for one not listed."""
    if single:
        return "toInt64(0)"
    keys, buckets = [unit for unit, _ in pairs], [bucket for _, bucket in pairs]
    return (f"transform(toInt64({column}), CAST({sql_literal(keys)} AS Array(Int64)),"
            f" CAST({sql_literal(buckets)} AS Array(Int64)), toInt64(-1))")


def _raw_key(bounds: list[int]) -> str:
    if len(bounds) == 2:
        return "toInt64(0)"
    return f"toInt64(arrayFirstIndex(x -> x > ts, CAST({sql_literal([int(b) for b in bounds])} AS Array(Int64)))) - 2"


def _range(column: str, pairs: list[tuple[int, int]]) -> str:
    """SQL: `column` (a day or an hour) one of those in `pairs` (ascending): a range of the table's key, and
    the list when it has gaps (the hours either side of a bucket's whole days)."""
    first, last = pairs[0][0], pairs[-1][0]
    terms = f"{column} >= {first} AND {column} <= {last}"
    if last - first + 1 != len(pairs):
        terms += f" AND {column} IN ({', '.join(str(unit) for unit, _ in pairs)})"
    return terms


def _spans(raw: list[tuple[int, int]]) -> str:
    return " OR ".join(f"(ts >= {start} AND ts < {end})" for start, end in raw)


def _name(filters: Filters) -> str:
    return "" if filters.event is None else f" AND name = {sql_literal(filters.event)}"


async def counts(store: ClickHouseStore, project_id: int, bounds: list[int], filters: Filters) -> list[Counts]:
    """Events, persons and sessions of each bucket [bounds[i], bounds[i + 1])."""
    found = plan(bounds, filters.rollup_ready)
    single = len(bounds) == 2
    rollup = f"project_id = {project_id} AND bot = 0"
    hours = found.all_hours
    parts = []
    if filters.event is not None:  # per-name sets: every whole hour from `hourly`
        if hours:
            parts.append(
                f"SELECT {_key('hour', hours, single)} AS k, toUInt64(0) AS e, uniqExactMergeState(users) AS u,"
                f" uniqExactMergeState(sessions) AS s FROM {store.t('hourly')} WHERE {rollup} AND {_range('hour', hours)}"
                f"{_name(filters)} GROUP BY k")
    else:
        for table, column, pairs in (("people_daily", "day", found.days), ("people_hourly", "hour", found.hours)):
            if pairs:
                parts.append(
                    f"SELECT {_key(column, pairs, single)} AS k, toUInt64(0) AS e, uniqExactMergeState(users) AS u,"
                    f" uniqExactMergeState(sessions) AS s FROM {store.t(table)} WHERE {rollup}"
                    f" AND {_range(column, pairs)} GROUP BY k")
    if found.raw:
        parts.append(
            f"SELECT {_raw_key(bounds)} AS k, count() AS e, uniqExactState(person) AS u, uniqExactState(session) AS s"
            f" FROM {store.t('events')} WHERE {store._conditions(project_id, filters)} AND ({_spans(found.raw)})"
            " GROUP BY k")
    statements = []
    if parts:
        statements.append(store.ch.select(
            f"SELECT k, sum(e), uniqExactMerge(u), uniqExactMerge(s) FROM ({' UNION ALL '.join(parts)}) GROUP BY k"))
    if hours:
        statements.append(store.ch.select(
            f"SELECT {_key('hour', hours, single)} AS k, countMerge(events) FROM {store.t('hourly')}"
            f" WHERE {rollup} AND {_range('hour', hours)}{_name(filters)} GROUP BY k"))
    answers = await asyncio.gather(*statements)
    result = [[0, 0, 0] for _ in range(len(bounds) - 1)]
    for bucket, events, users, sessions in answers[0] if parts else []:
        if 0 <= bucket < len(result):
            result[bucket] = [result[bucket][0] + events, users, sessions]
    for bucket, events in answers[-1] if hours else []:
        if 0 <= bucket < len(result):
            result[bucket][0] += events
    return [Counts(*row) for row in result]


async def name_counts(store: ClickHouseStore, project_id: int, window: Window, filters: Filters) -> list[tuple]:
    """(name, events) of every event name in the window matching the filters."""
    found = plan([window.start, window.end], filters.rollup_ready)
    hours = found.all_hours
    parts = []
    if hours:
        parts.append(f"SELECT name AS k, countMerge(events) AS e FROM {store.t('hourly')}"
                     f" WHERE project_id = {project_id} AND bot = 0 AND {_range('hour', hours)}{_name(filters)}"
                     " GROUP BY k")
    if found.raw:
        parts.append(f"SELECT name AS k, count() AS e FROM {store.t('events')}"
                     f" WHERE {store._conditions(project_id, filters)} AND ({_spans(found.raw)}) GROUP BY k")
    if not parts:
        return []
    return await store.ch.select(f"SELECT k, sum(e) FROM ({' UNION ALL '.join(parts)}) GROUP BY k")


async def session_sums(store: ClickHouseStore, project_id: int, window: Window,
                       filters: Filters) -> tuple[int, int, int, int]:
    """(sessions, bounces, total duration ms, total page views) of the non-bot sessions that started in the
    window (with a matching event in it, when filtered), as the SQLite store's session_sums."""
    rows = await store.ch.select(
        "SELECT count(), sum(ev = 1), sum(l - f), sum(pv) FROM ("
        " SELECT session, minMerge(first) AS f, maxMerge(last) AS l, countMerge(events) AS ev,"
        " sumMerge(pageviews) AS pv, argMinMerge(bot) AS b"
        f" FROM {store.t('sessions')} WHERE {started(store, project_id, window, filters)}"
        f" GROUP BY session HAVING f >= {window.start} AND f < {window.end} AND b = 0)")
    return tuple(int(value or 0) for value in rows[0]) if rows else (0, 0, 0, 0)


def started(store: ClickHouseStore, project_id: int, window: Window, filters: Filters) -> str:
    """WHERE terms over the `sessions` rollup: the project's sessions that may have started in the window
    (their earliest event in one of its hours), with a matching event in it when filtered. The caller keeps
    those whose merged first time is in the window."""
    terms = (f"project_id = {project_id} AND session GLOBAL IN (SELECT session FROM {store.t('session_starts')}"
             f" WHERE project_id = {project_id} AND hour >= {window.start // HOUR_MS}"
             f" AND hour <= {(window.end - 1) // HOUR_MS})")
    if filters != Filters():
        terms += (f" AND session GLOBAL IN (SELECT session FROM {store.t('events')}"
                  f" WHERE {store._conditions(project_id, filters)} AND ts >= {window.start} AND ts < {window.end})")
    return terms


async def period(store: ClickHouseStore, project_id: int, window: Window, filters: Filters) -> PeriodStats:
    totals, names, sums = await asyncio.gather(
        counts(store, project_id, [window.start, window.end], filters),
        name_counts(store, project_id, window, filters),
        session_sums(store, project_id, window, filters))
    top = max(names, key=lambda row: (row[1], row[0]), default=None)
    stats = session_stats(sums)
    days = max((window.end - window.start) / DAY_MS, 1 / 24)
    events, users, sessions = totals[0].events, totals[0].unique_users, totals[0].sessions
    return PeriodStats(
        events=events, unique_users=users, sessions=sessions, bounce_rate=stats.bounce_rate,
        avg_session_seconds=stats.avg_session_seconds, pages_per_session=stats.pages_per_session,
        top_event=None if top is None else TopEvent(top[0], top[1]), daily_average=round(events / days, 1),
        distinct_events=len(names))
