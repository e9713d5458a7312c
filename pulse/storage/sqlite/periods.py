"""The numbers of a period: the overview of a window and of the one before it, events, users and sessions
per time bucket, and the projects list's summary. Whole hours come from the rollups or the day cache
(`digests`), sessions from the days they started (`sessions`), the rest from raw events.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
from msgspec import structs

from pulse.protocol import Counts, OverviewStats, PeriodStats, ProjectSummary, TopEvent
from pulse.storage.model import Filters, Window
from pulse.storage.model import DAY_MS, HOUR_MS
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.aggregates import Totals, hourly, name_id
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.digests import cached_digests, totals, totals_and_names
from pulse.storage.sqlite.scans import RAW_FROM, event_conditions, scan_totals
from pulse.storage.sqlite.sessions import session_days, session_stats, session_sums
from pulse.storage.sqlite.tallies import cached_people

LIVE_WINDOW_MS = 5 * 60_000


def _period(snap: Snapshot, project_id: int, window: Window, filters: Filters) -> PeriodStats:
    found, names = totals_and_names(snap, project_id, window, filters)
    top = max(names.items(), key=lambda item: (item[1].events, item[0]), default=None)
    days = max((window.end - window.start) / DAY_MS, 1 / 24)
    stats = session_stats(session_sums(snap, project_id, window, filters, found.sessions))
    return PeriodStats(
        events=found.events,
        unique_users=len(found.users),
        sessions=len(found.sessions),  # with an event in the window (stats counts those that started in it)
        bounce_rate=stats.bounce_rate,
        avg_session_seconds=stats.avg_session_seconds,
        pages_per_session=stats.pages_per_session,
        top_event=None if top is None else TopEvent(top[0], top[1].events),
        daily_average=round(found.events / days, 1),
        distinct_events=len(names),
    )


def overview(snap: Snapshot, project_id: int, window: Window, now_ms: int,
             filters: Filters = Filters()) -> OverviewStats:
    current = _period(snap, project_id, window, filters)
    live = scan_totals(snap, project_id, now_ms - LIVE_WINDOW_MS, now_ms + 1, filters)
    return OverviewStats(**structs.asdict(current), live_visitors=len(live.users),
                         previous=_period(snap, project_id, window.previous, filters))


def cache_for_filters(snap: Snapshot, project_id: int, window: Window) -> None:
    """Fill the day cache with what any trait filter is answered from (the start-up warm-up): the `People`
    of the window's whole hours, and its sessions by start day (`SessionDay`)."""
    hours, _ = window.split()
    if hours is not None:
        for _ in cached_people(snap, project_id, hours):
            pass
    for _ in session_days(snap, project_id, window):
        pass


def timeseries(snap: Snapshot, project_id: int, bounds: list[int], filters: Filters) -> list[Counts]:
    """Events, users and sessions per bucket; bounds are the bucket edges [b0, b1, …, bn] in ms."""
    buckets = [Totals() for _ in range(len(bounds) - 1)]
    window = Window(bounds[0], bounds[-1])
    hours, _ = window.split()
    covered: set[int] = set()  # hours answered by the rollups or the day cache
    if hours is not None:
        if filters.rollup_ready:
            event_id = name_id(snap, filters.event)
            if event_id < 0:
                return [_counts(b) for b in buckets]
            per_hour = hourly(snap, project_id, hours, event_id)
        else:
            per_hour = {}
            for digest in cached_digests(snap, project_id, hours, filters):
                per_hour.update(digest.hours)
        for hour in range(*hours):  # whole hours inside one bucket (an hour without a rollup row had no events)
            if hour * HOUR_MS + HOUR_MS <= bounds[bisect_right(bounds, hour * HOUR_MS)]:
                covered.add(hour)
        for hour, total in per_hour.items():
            if hour in covered:
                buckets[bisect_right(bounds, hour * HOUR_MS) - 1].add(total)
    for start, end in _uncovered(window, covered):  # the rest from raw events, range by range
        found = column_scans.matched(snap, project_id, start, end, filters)
        if found is not None:
            ts, persons, sessions = found.column("ts"), found.column("person"), found.column("session")
            at = np.searchsorted(bounds, ts, "right") - 1
            for bucket, rows in column_scans.groups(at):
                buckets[bucket].add(Totals(len(rows), column_scans.bitmap(persons[rows]),
                                           column_scans.bitmap(sessions[rows][sessions[rows] > 0])))
            continue
        where, params = event_conditions(snap, project_id, start, end, filters)
        for ts, person_id, session_id in snap.conn.execute(
            f"SELECT e.ts, e.person_id, e.session_id {RAW_FROM} WHERE {where}", params
        ):
            bucket = buckets[bisect_right(bounds, ts) - 1]
            bucket.events += 1
            bucket.users.add(person_id)
            if session_id is not None:
                bucket.sessions.add(session_id)
    return [_counts(b) for b in buckets]


def project_summary(snap: Snapshot, project_id: int, today: Window, hours: list[int]) -> ProjectSummary:
    """Events since local midnight, and events per hour for the bounds given (the projects list)."""
    return ProjectSummary(totals(snap, project_id, today).events,
                          [bucket.events for bucket in timeseries(snap, project_id, hours, Filters())])


def _uncovered(window: Window, covered: set[int]) -> list[tuple[int, int]]:
    """The parts of the window outside the covered hours, as few [start, end) ranges as can be."""
    pieces: list[tuple[int, int]] = []
    position = window.start
    for hour in sorted(covered):
        if position < hour * HOUR_MS:
            pieces.append((position, hour * HOUR_MS))
        position = max(position, (hour + 1) * HOUR_MS)
    if position < window.end:
        pieces.append((position, window.end))
    return pieces


def _counts(total: Totals) -> Counts:
    return Counts(total.events, len(total.users), len(total.sessions))
