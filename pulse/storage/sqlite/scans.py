"""Answers from raw events: the rows of a span that match the filters, read in bulk. What the rollups
cannot answer (the minutes at the edges of a window, and any filter but the event name) is scanned; scans
of whole days and single hours under filters fixed per hour are kept in the day cache (`cached_scans`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyroaring import BitMap

from pulse.storage.model import Filters
from pulse.storage.model import HOUR_MS, PAGE_VIEW
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.aggregates import Totals, from_rollups, name_id, summed_hours
from pulse.storage.sqlite.lookups import json_path, strings, trait_people, utm_sessions  # noqa: F401 (read from here too)
from pulse.storage.sqlite.day_cache import Snapshot, cached_spans, size

STRING_ID = "(SELECT id FROM strings WHERE value = ?)"  # the id of a string given as a parameter
RAW_FROM = "FROM events e LEFT JOIN agents a ON a.id = e.agent_id"


def event_conditions(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters
                     ) -> tuple[str, list]:
    """WHERE clause over `events e LEFT JOIN agents a`: the window, no bots, and the filters."""
    clauses = ["e.project_id = ?", "e.ts >= ?", "e.ts < ?", "coalesce(a.is_bot, 0) = 0"]
    params: list = [project_id, start, end]
    for column, value in (("name_id", filters.event), ("path_id", filters.path),
                          ("referrer_domain_id", filters.referrer), ("country_id", filters.country),
                          ("language_id", filters.language), ("screen_id", filters.screen)):
        if value is not None:
            clauses.append(f"e.{column} = {STRING_ID}")
            params.append(value)
    for column, value in (("browser", filters.browser), ("os", filters.os), ("device", filters.device)):
        if value is not None:
            clauses.append(f"a.{column} = ?")
            params.append(value)
    for column, value in (("utm_source_id", filters.utm_source), ("utm_medium_id", filters.utm_medium),
                          ("utm_campaign_id", filters.utm_campaign)):
        if value is not None:
            clauses.append(f"e.session_id IN (SELECT id FROM sessions WHERE project_id = ? AND {column} = {STRING_ID})")
            params += [project_id, value]
    for key, value in filters.props:
        clauses.append("CAST(json_extract(e.props, ?) AS TEXT) = ?")
        params += [json_path(key), value]
    if filters.traits:
        clauses.append("e.person_id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(trait_people(snap, project_id, filters.traits))))
    return " AND ".join(clauses), params


def scan_sql(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters) -> tuple[str, str, list]:
    """(FROM, WHERE, parameters) to read the events of [start, end) that match the filters in bulk.

    Events are stored about in time order, so when the span's ids are not mixed with many others' (late
    events), reading the table along its ids costs about a third of looking each row up from the index.
    """
    where, params = event_conditions(snap, project_id, start, end, filters)
    lowest, highest, count = snap.conn.execute(
        "SELECT min(id), max(id), count(*) FROM events WHERE project_id = ? AND ts >= ? AND ts < ?",
        (project_id, start, end)).fetchone()  # from the index events_ts alone
    if count and highest - lowest < 2 * count:
        return (RAW_FROM.replace("events e", "events e NOT INDEXED"), where + " AND e.id BETWEEN ? AND ?",
                [*params, lowest, highest])
    return RAW_FROM, where, params


def scan_totals(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters) -> Totals:
    """Events, users and sessions of the events of [start, end) that match the filters."""
    found = column_scans.matched(snap, project_id, start, end, filters)
    if found is not None:
        return column_scans.totals(found)
    source, where, params = scan_sql(snap, project_id, start, end, filters)
    found = Totals()
    users, sessions = [], []
    for person_id, session_id in snap.conn.execute(f"SELECT e.person_id, e.session_id {source} WHERE {where}", params):
        found.events += 1
        users.append(person_id)
        if session_id is not None:
            sessions.append(session_id)
    found.users.update(users)
    found.sessions.update(sessions)
    return found


def cached_scans(snap: Snapshot, project_id: int, hours: tuple[int, int], filters: Filters, kind: tuple,
                 compute: Callable[[int, int], object]) -> Iterator[object]:
    """`compute(start_ms, end_ms)` from raw events under `filters`, per whole day and single hour of `hours` from
    the day cache. Under trait filters a span is also told apart by which of its users have the traits now, and
    under UTM filters by which of its sessions have the values now (those of their first page view, which a
    late event can change), so a trait or a session that changes later is never answered from an older count."""
    people = trait_people(snap, project_id, filters.traits) if filters.traits else None
    sessions = utm_sessions(snap, project_id, filters)

    def who(span: tuple[int, int]) -> bytes:
        rolled = from_rollups(snap, project_id, span, 0)
        held = [] if people is None else [(rolled.users & people).serialize()]
        held += [] if sessions is None else [(rolled.sessions & sessions).serialize()]
        return hashlib.blake2b(b"/".join(held), digest_size=16).digest()

    return cached_spans(snap, project_id, hours, 0, ("filtered", filters, *kind),
                        lambda span: compute(span[0] * HOUR_MS, span[1] * HOUR_MS),
                        who if people is not None or sessions is not None else None)


@dataclass(frozen=True, slots=True)
class Digest:
    """What the raw events of a span that match some filters add to every event-level number, from one
    scan: in all and per hour (events, users, sessions), per event name, per page viewed and per user
    agent (events, users)."""

    total: Totals
    hours: dict[int, Totals]
    names: dict[str, Totals]
    pages: dict[str, Totals]
    agents: dict[int, Totals]

    def cache_size(self) -> int:
        return size(self.total) + sum(size(part) for part in (self.hours, self.names, self.pages, self.agents))


PAIR = 64  # a (person, session) pair as one integer while it is counted: person << 64 | session


@dataclass(frozen=True, slots=True)
class Scanned:
    """One person id per event of a scan: per hour, per event name, per page viewed and per user agent; and
    per hour, its events' sessions (ids, or (person, session) pairs as `person << PAIR | session`)."""

    hours: dict[int, list[int]]
    sessions: dict[int, list[int]]
    names: dict[str, list[int]]
    pages: dict[str, list[int]]
    agents: dict[int, list[int]]


def scan_pass(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters, *, pairs: bool) -> Scanned:
    """Everything a digest (`pairs` False) or a per-person tally (`pairs` True) of the events of [start, end)
    that match the filters is made of, in one read of the rows."""
    source, where, params = scan_sql(snap, project_id, start, end, filters)
    page_view = name_id(snap, PAGE_VIEW)
    hours: dict[int, list[int]] = defaultdict(list)
    sessions: dict[int, list[int]] = defaultdict(list)
    names: dict[int, list[int]] = defaultdict(list)
    pages: dict[int, list[int]] = defaultdict(list)
    agents: dict[int, list[int]] = defaultdict(list)
    for ts, name, person_id, session_id, path_id, agent_id in snap.conn.execute(
        f"SELECT e.ts, e.name_id, e.person_id, e.session_id, e.path_id, e.agent_id {source} WHERE {where}", params
    ):
        hour = ts // HOUR_MS
        hours[hour].append(person_id)
        if session_id is not None:
            sessions[hour].append(person_id << PAIR | session_id if pairs else session_id)
        names[name].append(person_id)
        if name == page_view and path_id is not None:
            pages[path_id].append(person_id)
        agents[agent_id].append(person_id)
    named = strings(snap, names.keys() | pages.keys())
    return Scanned(hours, sessions, {named[i]: people for i, people in names.items()},
                {named[i]: people for i, people in pages.items()}, agents)


def _counted(people: dict) -> dict:
    """Events and users per key, from one person id per event."""
    return {key: Totals(len(ids), BitMap(ids)) for key, ids in people.items()}


def scan_digest(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters) -> Digest:
    matched = column_scans.matched(snap, project_id, start, end, filters)
    if matched is not None:
        return Digest(*column_scans.digest_parts(snap, matched))
    found = scan_pass(snap, project_id, start, end, filters, pairs=False)
    hours = {hour: Totals(len(people), BitMap(people), BitMap(found.sessions.get(hour, ())))
             for hour, people in found.hours.items()}
    return Digest(summed_hours(hours), hours, _counted(found.names), _counted(found.pages), _counted(found.agents))
