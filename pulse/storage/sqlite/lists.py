"""Lists, newest first, a page at a time: sessions, identified users, raw events, one user's timeline.
Pages are cut by a cursor (timestamp, id) of the last row given."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from itertools import islice

from pyroaring import BitMap

from pulse.protocol import EventRow, SessionRow, SessionStats, UserRow
from pulse.storage.model import HOUR_MS, Cursor, Filters, Window
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.scans import event_conditions, json_path
from pulse.storage.sqlite.sessions import matched_sessions, session_stats, session_sums


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
    """Identified users (with traits, or linked from an anonymous id) active in the window, last seen first, and
    the cursor of the next page."""
    sql = (f"SELECT p.id, p.distinct_id, p.traits, p.first_seen, p.last_seen, p.event_count FROM persons p"
           f" WHERE p.project_id = ? AND p.last_seen >= ? AND p.first_seen < ? AND {_identified('p')}")
    params: list = [project_id, window.start, window.end]
    for key, value in filters.traits:
        sql += " AND CAST(json_extract(p.traits, ?) AS TEXT) = ?"
        params += [json_path(key), value]
    page, page_params = _cursor(cursor)
    rows = list(snap.conn.execute(
        sql + page.replace("ts_col", "p.last_seen").replace("id_col", "p.id") + " ORDER BY p.last_seen DESC, p.id DESC"
        " LIMIT ?", [*params, *page_params, limit + 1]))
    after = (rows[limit - 1][4], rows[limit - 1][0]) if len(rows) > limit else None
    return [_user(row) for row in rows[:limit]], after


def _user(row: tuple) -> UserRow:
    """From (id, distinct_id, traits, first_seen, last_seen, event_count) of persons."""
    _, distinct_id, traits, first, last, count = row
    return UserRow(distinct_id=distinct_id, traits=_json(traits), first_seen=first, last_seen=last, events=count)


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
    """Raw events in the window that match the filters, newest first."""
    where, params = event_conditions(snap, project_id, window.start, window.end, filters)
    page, page_params = _cursor(cursor)
    rows = list(snap.conn.execute(
        f"{_EVENT_COLUMNS} WHERE {where}" + page.replace("ts_col", "e.ts").replace("id_col", "e.id")
        + " ORDER BY e.ts DESC, e.id DESC LIMIT ?", [*params, *page_params, limit + 1]))
    return _event_rows(rows, limit)


def user_timeline(snap: Snapshot, project_id: int, distinct_id: str, window: Window, limit: int,
                  cursor: Cursor | None) -> tuple[UserRow, list[EventRow], Cursor | None] | None:
    """One user (by any of their distinct ids), their events in the window, newest first, and the cursor of the
    next page; None without such a user."""
    person = snap.conn.execute(
        "SELECT p.id, p.distinct_id, p.traits, p.first_seen, p.last_seen, p.event_count FROM person_ids i"
        " JOIN persons p ON p.id = i.person_id WHERE i.project_id = ? AND i.distinct_id = ?",
        (project_id, distinct_id),
    ).fetchone()
    if person is None:
        return None
    person_id, _, _, first, last, _ = person
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
    return (_user(person), *_event_rows(rows, limit))


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
