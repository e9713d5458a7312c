"""Sessions by the day they started: per whole UTC day from the day cache, reused while the writer's
generation of that day (table session_days) is the same; the rest of a window read directly. Under
filters, a day's sessions are matched against the sessions of the window's matching events.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from pyroaring import BitMap

from pulse.protocol import SessionStats
from pulse.storage.model import DAY_MS, Filters, Window
from pulse.storage.sqlite.connection import checkpoint
from pulse.storage.sqlite.column_scans import bitmap
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.digests import totals

SESSIONS_FROM = "FROM sessions s LEFT JOIN agents a ON a.id = s.agent_id"
SESSIONS_WHERE = "s.project_id = ? AND s.first_ts >= ? AND s.first_ts < ? AND coalesce(a.is_bot, 0) = 0"


def session_pieces(snap: Snapshot, project_id: int, window: Window, kind: tuple,
                   compute: Callable[[int, int], object]) -> Iterator[object]:
    """`compute(start, end)` over the sessions that started in the window: per whole UTC day from the day
    cache, the rest of the window directly. The writer records, per project and start day, the commit that
    last changed one of those sessions (table session_days): a cached day is reused while that is the same,
    and a day without a row has no sessions."""
    first, last = -(-window.start // DAY_MS), window.end // DAY_MS
    if first >= last:
        if window.start < window.end:
            yield compute(window.start, window.end)
        return
    generations = dict(snap.conn.execute(
        "SELECT day, generation FROM session_days WHERE project_id = ? AND day >= ? AND day < ?",
        (project_id, first, last)))
    for day in range(first, last):
        checkpoint()
        generation = generations.get(day)
        if generation is None:
            continue
        key = (snap.conn.filename, project_id, "sessions", *kind, day)
        cached = snap.days.get(key, generation)
        if cached is None:
            cached = compute(day * DAY_MS, day * DAY_MS + DAY_MS)
            snap.days.put(key, generation, cached)
        yield cached
    for start, end in ((window.start, first * DAY_MS), (last * DAY_MS, window.end)):
        if start < end:
            yield compute(start, end)


@dataclass(frozen=True, slots=True)
class SessionDay:
    """The non-bot sessions that started in a span, for matching against a set of session ids: what each
    adds is found by its rank in `ids`."""

    ids: BitMap
    bounced: BitMap
    durations: array
    pageviews: array
    persons: array

    def positions(self, sessions: BitMap) -> np.ndarray:
        """Where each of `sessions` (all in ids) is in the arrays (ids ascend, as the arrays do)."""
        return np.searchsorted(np.frombuffer(self.ids.to_array(), dtype=np.uint32),
                               np.frombuffer(sessions.to_array(), dtype=np.uint32))

    def column(self, values: array, positions: np.ndarray) -> np.ndarray:
        """One of the arrays at `positions`."""
        return np.frombuffer(values, dtype=np.int64)[positions] if len(values) else np.empty(0, dtype=np.int64)

    def cache_size(self) -> int:
        return 64 + 28 * len(self.ids)


def _session_day(snap: Snapshot, project_id: int, start: int, end: int) -> SessionDay:
    rows = snap.conn.execute(
        f"SELECT s.id, s.events = 1, s.last_ts - s.first_ts, s.pageviews, s.person_id {SESSIONS_FROM}"
        f" WHERE {SESSIONS_WHERE} ORDER BY s.id", (project_id, start, end)).fetchall()
    table = np.array(rows, dtype=np.int64).reshape(-1, 5)
    columns = [array("q", np.ascontiguousarray(table[:, i]).tobytes()) for i in (2, 3, 4)]
    return SessionDay(bitmap(table[:, 0]), bitmap(table[table[:, 1] == 1, 0]), *columns)


def session_days(snap: Snapshot, project_id: int, window: Window) -> Iterator[SessionDay]:
    return session_pieces(snap, project_id, window, ("table",),
                          lambda start, end: _session_day(snap, project_id, start, end))


def matched_sessions(snap: Snapshot, project_id: int, window: Window, filters: Filters) -> BitMap:
    """The sessions with an event in the window that matches the filters."""
    return totals(snap, project_id, window, filters).sessions


def session_sums(snap: Snapshot, project_id: int, window: Window, filters: Filters,
                 matched: BitMap | None = None) -> tuple[int, int, int, int]:
    """(sessions, bounces, total duration ms, total page views) of the sessions that started in the window
    (with a matching event in it, when filtered: `matched`, if the caller has it already)."""
    found = [0, 0, 0, 0]
    if filters != Filters():
        if matched is None:
            matched = matched_sessions(snap, project_id, window, filters)
        for day in session_days(snap, project_id, window):
            sessions = day.ids & matched
            positions = day.positions(sessions)
            found[0] += len(sessions)
            found[1] += len(day.bounced & sessions)
            found[2] += int(day.column(day.durations, positions).sum())
            found[3] += int(day.column(day.pageviews, positions).sum())
        return tuple(found)
    sql = (f"SELECT count(*), coalesce(sum(s.events = 1), 0), coalesce(sum(s.last_ts - s.first_ts), 0),"
           f" coalesce(sum(s.pageviews), 0) {SESSIONS_FROM} WHERE {SESSIONS_WHERE}")
    for sums in session_pieces(snap, project_id, window, ("sums",),
                               lambda start, end: snap.conn.execute(sql, (project_id, start, end)).fetchone()):
        for i, value in enumerate(sums):
            found[i] += value
    return tuple(found)


def session_stats(sums: tuple[int, int, int, int]) -> SessionStats:
    """Sessions, bounce rate, average duration and pages per session from session_sums."""
    count, bounces, duration, pages = sums
    return SessionStats(
        sessions=count,
        bounce_rate=round(bounces / count, 4) if count else 0.0,
        avg_session_seconds=round(duration / count / 1000, 1) if count else 0.0,
        pages_per_session=round(pages / count, 2) if count else 0.0,
    )
