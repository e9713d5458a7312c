"""Lists, newest first, a page at a time, as the SQLite store gives them (`pulse.storage.sqlite.lists`):
sessions, identified users, raw events, one user's timeline.

Pages are cut by a cursor (time, id) of the last row given. ClickHouse has no row ids: an event's id is
sipHash64 of its uuid, a session's and a person's sipHash64 of its key, so rows of the same millisecond come
in an order of their own (the SQLite store's is the order they were written in), the same on every page.
A person is shown by the distinct id an identify last named it by (`person_names`), else its own.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

from pulse.protocol import EventRow, SessionRow, SessionStats, UserRow
from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import Cursor, Filters, Window
from pulse.storage.sqlite.sessions import session_stats

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore


def _after(cursor: Cursor | None, ts: str, id_: str) -> str:
    return "" if cursor is None else f" AND ({ts} < {cursor[0]} OR ({ts} = {cursor[0]} AND {id_} < {cursor[1]}))"


def _in(values) -> str:
    return "(" + ", ".join(map(sql_literal, values)) + ")" if values else "('')"


def _page(rows: list[tuple], limit: int, ts: int, id_: int) -> Cursor | None:
    return (rows[limit - 1][ts], rows[limit - 1][id_]) if len(rows) > limit else None


def _none(text: str) -> str | None:
    return text or None


async def _names(store: ClickHouseStore, project_id: int, persons: set[str]) -> dict[str, str]:
    """The distinct id each person is shown by."""
    found = dict.fromkeys(persons, "")
    found.update(await store.ch.select(
        f"SELECT person, argMax(distinct_id, seq) FROM {store.t('person_names')}"
        f" WHERE project_id = {project_id} AND person IN {_in(persons)} GROUP BY person"))
    return {person: name or person for person, name in found.items()}


async def _traits(store: ClickHouseStore, project_id: int, persons: set[str]) -> dict[str, dict]:
    """The traits of those persons that ever had one set (an empty object once all were removed)."""
    found: dict[str, dict] = {}
    for person, key, value, _ in await store.ch.select(
            f"SELECT person, key, argMax(value, seq) AS v, min(seq) AS since FROM {store.t('person_traits')}"
            f" WHERE project_id = {project_id} AND person IN {_in(persons)} GROUP BY person, key ORDER BY since"):
        traits = found.setdefault(person, {})
        if value != "null":
            traits[key] = json.loads(value)
    return found


async def _lifetime(store: ClickHouseStore, project_id: int, persons: set[str]) -> dict[str, tuple[int, int, int]]:
    """(first seen, last seen, events) of each person over every event, bots' too."""
    return {person: (first, last, count) for person, first, last, count in await store.ch.select(
        f"SELECT person, min(ts), max(ts), count() FROM {store.t('events')}"
        f" WHERE project_id = {project_id} AND person IN {_in(persons)} GROUP BY person")}


async def sessions(store: ClickHouseStore, project_id: int, window: Window, filters: Filters, limit: int,
                   cursor: Cursor | None) -> tuple[SessionStats, list[SessionRow], Cursor | None]:
    """Aggregates of the non-bot sessions that started in the window (with a matching event in it, when
    filtered), a page of them, newest first, and the next page's cursor. A session's user agent is that of
    its earliest event."""
    matched = ""
    if filters != Filters():
        matched = (f" AND session GLOBAL IN (SELECT session FROM {store.t('events')}"
                   f" WHERE {store._conditions(project_id, filters)} AND ts >= {window.start} AND ts < {window.end})")
    rows = await store.ch.select(
        "SELECT session, anyMerge(person), minMerge(first) AS f, maxMerge(last), countMerge(events),"
        " sumMerge(pageviews), argMinIfMerge(entry), argMaxIfMerge(exit), argMinIfMerge(referrer),"
        " argMinIfMerge(utm_source), argMinMerge(bot) AS b, sipHash64(session) AS id"
        f" FROM {store.t('sessions')} WHERE project_id = {project_id}{matched} GROUP BY session"
        f" HAVING f >= {window.start} AND f < {window.end} AND b = 0{_after(cursor, 'f', 'id')}"
        f" ORDER BY f DESC, id DESC LIMIT {limit + 1}")
    page = rows[:limit]
    names = await _names(store, project_id, {row[1] for row in page})
    agents = {}
    if page:
        agents = {session: (browser, os_name, device) for session, browser, os_name, device in await store.ch.select(
            f"SELECT session, argMin(browser, ts), argMin(os, ts), argMin(device, ts) FROM {store.t('events')}"
            f" WHERE project_id = {project_id} AND person IN {_in({row[1] for row in page})}"
            f" AND session IN {_in([row[0] for row in page])} GROUP BY session")}
    found = [
        SessionRow(session_id=key, distinct_id=names[person], first_ts=first, last_ts=last,
                   duration_seconds=round((last - first) / 1000, 1), events=events, pageviews=pageviews,
                   entry_page=_none(entry), exit_page=_none(exit_page), referrer=_none(referrer),
                   utm_source=_none(source), browser=agents[key][0], os=agents[key][1], device=agents[key][2])
        for key, person, first, last, events, pageviews, entry, exit_page, referrer, source, _, _ in page]
    return session_stats(await store._session_sums(project_id, window, filters)), found, _page(rows, limit, 2, 11)


def _identified(store: ClickHouseStore, project_id: int) -> str:
    """SQL condition: the person has traits, or more than one distinct id (an identify linked another)."""
    return (f"(person GLOBAL IN (SELECT person FROM {store.t('person_traits')} WHERE project_id = {project_id})"
            " OR person GLOBAL IN (SELECT person FROM (SELECT distinct_id, argMax(person, version) AS person"
            f" FROM {store.t('person_ids')} WHERE project_id = {project_id} GROUP BY distinct_id)"
            " GROUP BY person HAVING count() > 1))")


async def _user_rows(store: ClickHouseStore, project_id: int, rows: list[tuple[str, int, int, int]],
                     window_counts: dict[str, int]) -> list[UserRow]:
    """From (person, first seen, last seen, lifetime events) rows."""
    persons = {row[0] for row in rows}
    names = await _names(store, project_id, persons)
    traits = await _traits(store, project_id, persons)
    return [UserRow(distinct_id=names[person], traits=traits.get(person), first_seen=first, last_seen=last,
                    window_events=window_counts.get(person, 0), lifetime_events=count)
            for person, first, last, count in rows]


async def users(store: ClickHouseStore, project_id: int, window: Window, filters: Filters, limit: int,
                cursor: Cursor | None) -> tuple[list[UserRow], Cursor | None]:
    """Identified users with an event in the window that matches the filters, last seen (ever) first, each
    with those events counted."""
    where = f"{store._conditions(project_id, filters)} AND ts >= {window.start} AND ts < {window.end}"
    rows = await store.ch.select(
        "SELECT person, min(ts), max(ts) AS last, count(), sipHash64(person) AS id"
        f" FROM {store.t('events')} WHERE project_id = {project_id}"
        f" AND person GLOBAL IN (SELECT person FROM {store.t('events')} WHERE {where})"
        f" AND {_identified(store, project_id)} GROUP BY person"
        f" HAVING 1{_after(cursor, 'last', 'id')} ORDER BY last DESC, id DESC LIMIT {limit + 1}")
    page = rows[:limit]
    counts = {}
    if page:
        counts = dict(await store.ch.select(
            f"SELECT person, count() FROM {store.t('events')} WHERE {where}"
            f" AND person IN {_in({row[0] for row in page})} GROUP BY person"))
    return await _user_rows(store, project_id, [row[:4] for row in page], counts), _page(rows, limit, 2, 4)


_EVENT_COLUMNS = ("SELECT hex(uuid), name, ts, person, path, url, referrer, props, browser, os, device,"
                  " sipHash64(uuid) AS id")


async def _event_rows(store: ClickHouseStore, project_id: int, rows: list[tuple], limit: int
                      ) -> tuple[list[EventRow], Cursor | None]:
    page = rows[:limit]
    names = await _names(store, project_id, {row[3] for row in page})
    found = [EventRow(uuid=str(uuid.UUID(hex=uid)), event=name, ts=ts, distinct_id=names[person], path=_none(path),
                      page_url=_none(url), referrer=_none(referrer), properties=json.loads(props) if props else None,
                      browser=browser, os=os_name, device=device)
             for uid, name, ts, person, path, url, referrer, props, browser, os_name, device, _ in page]
    return found, _page(rows, limit, 2, 11)


async def events(store: ClickHouseStore, project_id: int, window: Window, filters: Filters, limit: int,
                 cursor: Cursor | None) -> tuple[list[EventRow], Cursor | None]:
    """Raw events in the window that match the filters, newest first."""
    rows = await store.ch.select(
        f"{_EVENT_COLUMNS} FROM {store.t('events')} WHERE {store._conditions(project_id, filters)}"
        f" AND ts >= {window.start} AND ts < {window.end}{_after(cursor, 'ts', 'id')}"
        f" ORDER BY ts DESC, id DESC LIMIT {limit + 1}")
    return await _event_rows(store, project_id, rows, limit)


async def user_timeline(store: ClickHouseStore, project_id: int, distinct_id: str, window: Window, limit: int,
                        cursor: Cursor | None) -> tuple[UserRow, list[EventRow], Cursor | None] | None:
    """One user (by any of their distinct ids), every event of theirs in the window (bots' too), newest
    first, with the window's non-bot events counted; None without such a user."""
    found = await store.ch.select(
        f"SELECT argMax(person, version) FROM {store.t('person_ids')}"
        f" WHERE project_id = {project_id} AND distinct_id = {sql_literal(distinct_id)} GROUP BY distinct_id")
    if not found:
        return None
    person = found[0][0]
    lifetime = (await _lifetime(store, project_id, {person})).get(person)
    if lifetime is None:
        return None
    span = (f"project_id = {project_id} AND person = {sql_literal(person)}"
            f" AND ts >= {window.start} AND ts < {window.end}")
    rows = await store.ch.select(
        f"{_EVENT_COLUMNS} FROM {store.t('events')} WHERE {span}{_after(cursor, 'ts', 'id')}"
        f" ORDER BY ts DESC, id DESC LIMIT {limit + 1}")
    count = (await store.ch.select(f"SELECT count() FROM {store.t('events')} WHERE {span} AND bot = 0"))[0][0]
    user = (await _user_rows(store, project_id, [(person, *lifetime)], {person: count}))[0]
    return (user, *await _event_rows(store, project_id, rows, limit))
