"""Lists, newest first, a page at a time: sessions, identified users, raw events, one user's timeline.
Pages are cut by a cursor (timestamp, id) of the last row given."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterator
from itertools import islice

import numpy as np
from pyroaring import BitMap

from pulse.protocol import EventRow, SessionRow, SessionStats, UserRow
from pulse.storage.model import HOUR_MS, Cursor, Filters, Window
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.column_scans import Matched
from pulse.storage.sqlite.columns import Segment
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.digests import totals
from pulse.storage.sqlite.scans import RAW_FROM, event_conditions
from pulse.storage.sqlite.sessions import matched_sessions, session_stats, session_sums
from pulse.storage.sqlite.tallies import cached_people


def _cursor(cursor: Cursor | None) -> tuple[str, list]:
    return ("", []) if cursor is None else (" AND (ts_col < ? OR (ts_col = ? AND id_col < ?))",
                                            [cursor[0], cursor[0], cursor[1]])


def sessions(snap: Snapshot, project_id: int, window: Window, filters: Filters, limit: int,
             cursor: Cursor | None) -> tuple[SessionStats, list[SessionRow], Cursor | None]:
    """Aggregates of the sessions that started in the window, a page of them, newest first, and the cursor of
    the next page (None on the last)."""
    sql = (
        "SELECT s.id, s.session_key, p.distinct_id, s.first_ts, s.last_ts, s.events, s.pageviews, en.value, ex.value,"
        " rf.value, us.value, a.browser, a.os, a.device FROM sessions s"
        " JOIN persons p ON p.id = s.person_id LEFT JOIN agents a ON a.id = s.agent_id"
        " LEFT JOIN strings en ON en.id = s.entry_path_id LEFT JOIN strings ex ON ex.id = s.exit_path_id"
        " LEFT JOIN strings rf ON rf.id = s.referrer_id LEFT JOIN strings us ON us.id = s.utm_source_id"
        " WHERE s.project_id = ? AND s.first_ts >= ? AND s.first_ts < ? AND coalesce(a.is_bot, 0) = 0"
    )
    page, page_params = _cursor(cursor)
    matched = None if filters == Filters() else matched_sessions(snap, project_id, window, filters)
    cursor = snap.conn.execute(
        sql + page.replace("ts_col", "s.first_ts").replace("id_col", "s.id") + " ORDER BY s.first_ts DESC, s.id DESC",
        [project_id, window.start, window.end, *page_params])
    newest = cursor if matched is None else (row for row in cursor if row[0] in matched)  # with a matching event
    rows = list(islice(newest, limit + 1))
    cursor.close()
    found = [
        SessionRow(session_id=key, distinct_id=distinct_id, first_ts=first, last_ts=last,
                   duration_seconds=round((last - first) / 1000, 1), events=events, pageviews=pageviews,
                   entry_page=entry, exit_page=exit_page, referrer=referrer, utm_source=source,
                   browser=browser, os=os_name, device=device)
        for _, key, distinct_id, first, last, events, pageviews, entry, exit_page, referrer, source, browser, os_name,
        device in rows[:limit]
    ]
    after = (rows[limit - 1][3], rows[limit - 1][0]) if len(rows) > limit else None
    return session_stats(session_sums(snap, project_id, window, filters, matched)), found, after


def _identified(alias: str) -> str:
    return (f"({alias}.traits IS NOT NULL OR EXISTS (SELECT 1 FROM person_ids i WHERE i.project_id = {alias}.project_id"
            f" AND i.person_id = {alias}.id AND i.distinct_id != {alias}.distinct_id))")


def users(snap: Snapshot, project_id: int, window: Window, filters: Filters, limit: int,
          cursor: Cursor | None) -> tuple[list[UserRow], Cursor | None]:
    """Identified users (with traits, or linked from an anonymous id) with an event in the window that matches
    the filters (among the overview's unique users), last seen first, each with those events counted, and the
    cursor of the next page. From the event columns, the matching events counted per person in one pass;
    without them, the overview's users and then each listed user's events counted from the rollups and rows."""
    found = column_scans.matched(snap, project_id, window.start, window.end, filters)
    per_person = None if found is None else _per_person(found)
    active = totals(snap, project_id, window, filters).users if per_person is None else np.flatnonzero(per_person)
    if not len(active):
        return [], None
    sql = (f"SELECT {_PERSON_COLUMNS} FROM persons p WHERE p.project_id = ?"
           f" AND p.id IN (SELECT value FROM json_each(?)) AND {_identified('p')}")
    params: list = [project_id, json.dumps(list(active) if per_person is None else active.tolist())]
    page, page_params = _cursor(cursor)
    rows = list(snap.conn.execute(
        sql + page.replace("ts_col", "p.last_seen").replace("id_col", "p.id") + " ORDER BY p.last_seen DESC, p.id DESC"
        " LIMIT ?", [*params, *page_params, limit + 1]))
    after = (rows[limit - 1][4], rows[limit - 1][0]) if len(rows) > limit else None
    if per_person is None:
        counts = _window_events(snap, project_id, window, filters, BitMap(row[0] for row in rows[:limit]))
    else:
        counts = {row[0]: int(per_person[row[0]]) for row in rows[:limit]}
    return [_user(row, counts.get(row[0], 0)) for row in rows[:limit]], after


def _per_person(found: Matched) -> np.ndarray:
    """How many of the matching events each person id had."""
    persons = [segment.at("person", rows) for segment, rows in found.parts]
    counts = np.zeros(max((int(part.max()) + 1 for part in persons if len(part)), default=0), dtype=np.int64)
    for part in persons:
        counts += np.bincount(part, minlength=len(counts))
    return counts


def _window_events(snap: Snapshot, project_id: int, window: Window, filters: Filters, people: BitMap
                  ) -> dict[int, int]:
    """How many events in the window that match the filters each of `people` had. Unfiltered, and under trait
    filters alone (which the people listed already have), whole hours are read from the per-person tallies
    of the day cache; everything else from the raw events."""
    counts: dict[int, int] = defaultdict(int)
    hours, raw = window.split()
    if hours is not None and (filters == Filters() or filters.traits_only):
        for part in cached_people(snap, project_id, hours):
            for tally in part.hours.values():
                for bit, members in enumerate(tally.slices):
                    for person in BitMap.deserialize(members) & people:
                        counts[person] += 1 << bit
        filters = Filters()  # the raw edges: the people listed have the traits
    else:
        raw = [(window.start, window.end)]
    for start, end in raw:
        where, params = event_conditions(snap, project_id, start, end, filters)
        for person, count in snap.conn.execute(
            f"SELECT e.person_id, count(*) {RAW_FROM} WHERE {where} AND e.person_id IN (SELECT value FROM json_each(?))"
            " GROUP BY e.person_id", [*params, json.dumps(list(people))]
        ):
            counts[person] += count
    return counts


_PERSON_COLUMNS = "p.id, p.distinct_id, p.traits, p.first_seen, p.last_seen, p.event_count"


def _user(row: tuple, window_count: int) -> UserRow:
    """From _PERSON_COLUMNS of persons, and the person's events in the window asked about."""
    _, distinct_id, traits, first, last, count = row
    return UserRow(distinct_id=distinct_id, traits=_json(traits), first_seen=first, last_seen=last,
                   window_events=window_count, lifetime_events=count)


_EVENT_COLUMNS = (
    "SELECT e.id, e.uuid, n.value, e.ts, p.distinct_id, pa.value, u.value, r.value, e.props, a.browser, a.os, a.device"
    " FROM events e LEFT JOIN agents a ON a.id = e.agent_id JOIN strings n ON n.id = e.name_id"
    " JOIN persons p ON p.id = e.person_id LEFT JOIN strings pa ON pa.id = e.path_id"
    " LEFT JOIN strings u ON u.id = e.url_id LEFT JOIN strings r ON r.id = e.referrer_id"
)


def _event_rows(rows: list[tuple], limit: int) -> tuple[list[EventRow], Cursor | None]:
    """A page of _EVENT_COLUMNS rows (one more than `limit` if there are more), and the next page's cursor."""
    found = [EventRow(uuid=str(_uuid(uid)), event=name, ts=ts, distinct_id=distinct_id, path=path, page_url=url,
                      referrer=referrer, properties=_json(props), browser=browser, os=os_name, device=device)
             for _, uid, name, ts, distinct_id, path, url, referrer, props, browser, os_name, device in rows[:limit]]
    return found, ((rows[limit - 1][3], rows[limit - 1][0]) if len(rows) > limit else None)


def events(snap: Snapshot, project_id: int, window: Window, filters: Filters, limit: int,
           cursor: Cursor | None) -> tuple[list[EventRow], Cursor | None]:
    """Raw events in the window that match the filters, newest first: the page's events found in the event
    columns and read by id, or without columns read from the table in order."""
    found = column_scans.matched(snap, project_id, window.start, window.end, filters)
    if found is not None:
        return _event_rows(_rows_by_id(snap, _newest(found.parts, limit + 1, cursor)[1]), limit)
    where, params = event_conditions(snap, project_id, window.start, window.end, filters)
    page, page_params = _cursor(cursor)
    rows = list(snap.conn.execute(
        f"{_EVENT_COLUMNS} WHERE {where}" + page.replace("ts_col", "e.ts").replace("id_col", "e.id")
        + " ORDER BY e.ts DESC, e.id DESC LIMIT ?", [*params, *page_params, limit + 1]))
    return _event_rows(rows, limit)


def _newest(parts: list[tuple[Segment, np.ndarray]], count: int, cursor: Cursor | None
            ) -> tuple[list[int], list[int]]:
    """(ts, id) of the `count` newest of some rows of segments (each part's positions ascending) that come
    before the cursor, newest first, ties by the larger id as `ORDER BY ts DESC, id DESC`. A segment is
    sorted by (ts, id), so each part's newest are its last positions before the cursor's place."""
    times, ids = [], []
    for segment, rows in parts:
        ts, event_ids = segment.cols["ts"], segment.cols["id"]
        stop = len(rows)
        if cursor is not None:
            low, high = int(np.searchsorted(ts, cursor[0], "left")), int(np.searchsorted(ts, cursor[0], "right"))
            place = low + int(np.searchsorted(event_ids[low:high], cursor[1], "left"))
            stop = int(np.searchsorted(rows, place, "left"))
        last = rows[max(0, stop - count):stop]
        times.append(ts[last].astype(np.int64))
        ids.append(event_ids[last].astype(np.int64))
    if not times:
        return [], []
    times_a, ids_a = np.concatenate(times), np.concatenate(ids)
    order = np.lexsort((ids_a, times_a))[::-1][:count]
    return times_a[order].tolist(), ids_a[order].tolist()


def _rows_by_id(snap: Snapshot, ids: list[int]) -> list[tuple]:
    """_EVENT_COLUMNS rows of the events with these ids, in the order given."""
    rows = {row[0]: row for row in snap.conn.execute(
        f"{_EVENT_COLUMNS} WHERE e.id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))}
    return [rows[event_id] for event_id in ids]


def user_timeline(snap: Snapshot, project_id: int, distinct_id: str, window: Window, limit: int,
                  cursor: Cursor | None) -> tuple[UserRow, list[EventRow], Cursor | None] | None:
    """One user (by any of their distinct ids), their events in the window (crawlers' too), newest first, with
    those that are not a crawler's counted, and the cursor of the next page; None without such a user."""
    person = snap.conn.execute(
        f"SELECT {_PERSON_COLUMNS} FROM person_ids i"
        " JOIN persons p ON p.id = i.person_id WHERE i.project_id = ? AND i.distinct_id = ?",
        (project_id, distinct_id),
    ).fetchone()
    if person is None:
        return None
    person_id, _, _, first, last, _ = person
    seen = Window(max(window.start, first), min(window.end, last + 1))
    found = column_scans.matched(snap, project_id, seen.start, seen.end, Filters())
    if found is not None:
        return _timeline_from_columns(snap, project_id, person, seen, found, limit, cursor)
    page, page_params = _cursor(cursor)
    end = window.end if cursor is None else min(window.end, cursor[0] + 1)
    rows: list[tuple] = []
    for start, stop in _person_ranges(snap, project_id, person_id, Window(max(window.start, first), min(end, last + 1))):
        rows += snap.conn.execute(
            f"{_EVENT_COLUMNS} WHERE e.project_id = ? AND e.ts >= ? AND e.ts < ? AND e.person_id = ?"
            + page.replace("ts_col", "e.ts").replace("id_col", "e.id") + " ORDER BY e.ts DESC, e.id DESC LIMIT ?",
            [project_id, start, stop, person_id, *page_params, limit + 1 - len(rows)])
        if len(rows) > limit:
            break
    count = 0
    for start, stop in _person_ranges(snap, project_id, person_id, seen):
        where, params = event_conditions(snap, project_id, start, stop, Filters())
        count += snap.conn.execute(f"SELECT count(*) {RAW_FROM} WHERE {where} AND e.person_id = ?",
                                   [*params, person_id]).fetchone()[0]
    return (_user(person, count), *_event_rows(rows, limit))


def _timeline_from_columns(snap: Snapshot, project_id: int, person: tuple, seen: Window, found: Matched,
                           limit: int, cursor: Cursor | None) -> tuple[UserRow, list[EventRow], Cursor | None]:
    """user_timeline from the event columns (`found`: every non-bot event of `seen`, the part of the window
    between the person's first and last event): the person's events among them, and their crawler events
    (which the columns leave out) from the hours whose crawler rollup has the person and the minutes at the
    edges. The page's events are then read by id."""
    person_id = person[0]
    mine = [(segment, rows[segment.at("person", rows) == person_id]) for segment, rows in found.parts]
    times, ids = _newest(mine, limit + 1, cursor)
    page, page_params = _cursor(cursor)
    for start, stop in _crawler_ranges(snap, project_id, person_id, seen):
        for ts, event_id in snap.conn.execute(
            f"SELECT e.ts, e.id {RAW_FROM} WHERE e.project_id = ? AND e.ts >= ? AND e.ts < ? AND e.person_id = ?"
            " AND coalesce(a.is_bot, 0) != 0" + page.replace("ts_col", "e.ts").replace("id_col", "e.id")
            + " ORDER BY e.ts DESC, e.id DESC LIMIT ?", [project_id, start, stop, person_id, *page_params, limit + 1]
        ):
            times.append(ts)
            ids.append(event_id)
    newest = sorted(zip(times, ids), reverse=True)[:limit + 1]
    count = sum(len(rows) for _, rows in mine)
    return (_user(person, count), *_event_rows(_rows_by_id(snap, [event_id for _, event_id in newest]), limit))


def _crawler_ranges(snap: Snapshot, project_id: int, person_id: int, window: Window) -> list[tuple[int, int]]:
    """The parts of the window that can hold the person's crawler events: the whole hours whose rollup of
    crawler events has the person in its set of users, and the minutes at the edges."""
    hours, raw = window.split()
    if hours is None:
        return raw
    present = {hour for hour, user_set in snap.conn.execute(
        "SELECT hour, user_set FROM hourly WHERE project_id = ? AND name_id = 0 AND bot != 0 AND hour >= ?"
        " AND hour < ?", (project_id, *hours)) if person_id in BitMap.deserialize(user_set)}
    return raw + [(hour * HOUR_MS, (hour + 1) * HOUR_MS) for hour in sorted(present)]


def _person_ranges(snap: Snapshot, project_id: int, person_id: int, window: Window
                   ) -> Iterator[tuple[int, int]]:
    """The parts of the window that can hold the person's events, newest first: the whole hours whose
    rollup (of every event, bots too) has the person in its set of users, and the minutes at the edges."""
    hours, raw = window.split()
    if hours is None:
        yield from reversed(raw)
        return
    if raw and raw[-1][0] >= hours[1] * HOUR_MS:
        yield raw.pop()
    present = sorted({hour for hour, user_set in snap.conn.execute(
        "SELECT hour, user_set FROM hourly WHERE project_id = ? AND name_id = 0 AND hour >= ? AND hour < ?",
        (project_id, *hours)) if person_id in BitMap.deserialize(user_set)}, reverse=True)
    while present:  # runs of consecutive hours as one range
        top = bottom = present.pop(0)
        while present and present[0] == bottom - 1:
            bottom = present.pop(0)
        yield bottom * HOUR_MS, (top + 1) * HOUR_MS
    yield from raw


def _json(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)


def _uuid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=raw)
