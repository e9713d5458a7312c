"""Breakdowns: per event name, per page, user agent, country, language or screen class, per session entry,
exit, referrer or UTM value, per event property key or value, per person trait. Unfiltered event-level
breakdowns come from the hourly dimension rollups, filtered ones from digests (`digests`; countries,
languages and screens from cached scans), session-level ones from sessions by start day (`sessions`),
property keys and values from per-person tallies of whole days or cached scans.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from pyroaring import BitMap

from pulse.protocol import Ranked
from pulse.storage.model import Filters, Window
from pulse.storage.model import HOUR_MS, PAGE_VIEW
from pulse.storage.sqlite.rollup_sets import DIM_AGENT, DIM_COUNTRY, DIM_LANGUAGE, DIM_PAGE, DIM_SCREEN
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.aggregates import Totals, merge, name_id
from pulse.storage.sqlite.day_cache import Snapshot, cached_spans
from pulse.storage.sqlite.digests import digests, totals, totals_and_names
from pulse.storage.sqlite.scans import (
    RAW_FROM, STRING_ID, Digest, cached_scans, event_conditions, json_path, scan_sql, strings, trait_people,
)
from pulse.storage.sqlite.sessions import (
    SESSIONS_FROM, SESSIONS_WHERE, SessionDay, matched_sessions, session_days, session_pieces,
)
from pulse.storage.sqlite.tallies import Tally


def top_events(snap: Snapshot, project_id: int, window: Window, filters: Filters, limit: int) -> list[Ranked]:
    return _ranked(totals_and_names(snap, project_id, window, filters)[1], limit)


# event-level breakdowns: what is grouped, and which events count
EVENT_DIMENSIONS = {
    "pages": ("ps.value", "JOIN strings ps ON ps.id = e.path_id", f"e.name_id = {STRING_ID}", [PAGE_VIEW]),
    "browsers": ("a.browser", "", "a.browser IS NOT NULL", []),
    "os": ("a.os", "", "a.os IS NOT NULL", []),
    "devices": ("a.device", "", "a.device IS NOT NULL", []),
    # events without a known value (stored before these were, or not told) have NULL: the JOIN leaves them out
    "countries": ("cs.value", "JOIN strings cs ON cs.id = e.country_id", "1", []),
    "languages": ("ls.value", "JOIN strings ls ON ls.id = e.language_id", "1", []),
    "screens": ("ss.value", "JOIN strings ss ON ss.id = e.screen_id", "1", []),
}
# the dimensions filtered breakdowns take from digests; the others scan raw events per whole day (cached)
_DIGESTED = ("pages", "browsers", "os", "devices")
# session-level breakdowns, over sessions that started in the window: entry and exit page, source
SESSION_DIMENSIONS = {
    "entry-pages": "entry_path_id",
    "exit-pages": "exit_path_id",
    "referrers": "referrer_id",
    "utm_source": "utm_source_id",
    "utm_medium": "utm_medium_id",
    "utm_campaign": "utm_campaign_id",
}


# unfiltered event-level breakdowns from hourly_dims: (dim, what the value id names)
_DIM_ROLLUPS = {
    "pages": ("SELECT v.value, d.events, d.user_set FROM hourly_dims d JOIN strings v ON v.id = d.value_id"
              f" WHERE d.project_id = ? AND d.dim = {DIM_PAGE} AND d.bot = 0 AND d.hour >= ? AND d.hour < ?"),
    **{name: (f"SELECT a.{column}, d.events, d.user_set FROM hourly_dims d JOIN agents a ON a.id = d.value_id"
              f" WHERE d.project_id = ? AND d.dim = {DIM_AGENT} AND d.bot = 0 AND d.hour >= ? AND d.hour < ?")
       for name, column in (("browsers", "browser"), ("os", "os"), ("devices", "device"))},
    **{name: ("SELECT v.value, d.events, d.user_set FROM hourly_dims d JOIN strings v ON v.id = d.value_id"
              f" WHERE d.project_id = ? AND d.dim = {dim} AND d.bot = 0 AND d.hour >= ? AND d.hour < ?")
       for name, dim in (("countries", DIM_COUNTRY), ("languages", DIM_LANGUAGE), ("screens", DIM_SCREEN))},
}


def _ranked(found: dict[str, Totals], limit: int) -> list[Ranked]:
    rows = [Ranked(value, t.events, len(t.users)) for value, t in found.items()]
    rows.sort(key=lambda r: (-r.count, r.value))
    return rows[:limit]


def _by_value(snap: Snapshot, project_id: int, window: Window, filters: Filters, kind: tuple,
              scan: Callable[[int, int], dict], whole_hours: Callable[[tuple[int, int]], dict] | None = None
              ) -> dict[str, Totals]:
    """{value: Totals} over the window: whole hours from `whole_hours` (rollups) when given, else from the day
    cache of `scan(start_ms, end_ms)`; the minutes at the edges, and filters no cache can hold, by `scan`."""
    hours, raw = window.split()
    found: dict[str, Totals] = defaultdict(Totals)
    if hours is None:
        pass
    elif whole_hours is not None:
        found = whole_hours(hours)  # fresh totals, safe to add to
    else:
        found = merge(cached_scans(snap, project_id, hours, filters, kind, scan))
    return merge((scan(start, end) for start, end in raw), found)


def event_values(snap: Snapshot, project_id: int, window: Window, filters: Filters, dimension: str
                 ) -> dict[str, Totals]:
    """Events and users per value of an event-level breakdown (goals count page views by path from it too).
    Unfiltered: whole hours from hourly_dims, the minutes at the edges from raw events. Filtered: digests,
    or for countries, languages and screens scans of raw events (whole days of them cached)."""
    filtered = filters != Filters()
    if filtered and dimension in _DIGESTED:
        found = list(digests(snap, project_id, window, filters))
        if dimension == "pages":
            return merge(digest.pages for digest in found)
        column = {"browsers": "browser", "os": "os", "devices": "device"}[dimension]
        named = dict(snap.conn.execute(f"SELECT id, {column} FROM agents"))
        return _by_agent(found, named)
    value_sql, join, condition, extra = EVENT_DIMENSIONS[dimension]

    def scan(start: int, end: int) -> dict[str, Totals]:
        found = column_scans.matched(snap, project_id, start, end, filters)
        if found is not None:
            return _column_values(snap, found, dimension)
        where, params = event_conditions(snap, project_id, start, end, filters)
        people: dict[str, list[int]] = defaultdict(list)
        for value, person_id in snap.conn.execute(
            f"SELECT {value_sql}, e.person_id {RAW_FROM} {join} WHERE {where} AND {condition}", [*params, *extra]
        ):
            people[value].append(person_id)
        return {value: Totals(len(ids), BitMap(ids)) for value, ids in people.items()}

    def rolled_up(span: tuple[int, int]) -> dict[str, Totals]:
        values: dict[str, Totals] = defaultdict(Totals)
        for value, events, user_set in snap.conn.execute(_DIM_ROLLUPS[dimension], (project_id, *span)):
            values[value].add(Totals(events, BitMap.deserialize(user_set)))
        return dict(values)

    def whole_hours(hours: tuple[int, int]) -> dict[str, Totals]:
        return merge(cached_spans(snap, project_id, hours, 0, ("dim", dimension), rolled_up))

    return _by_value(snap, project_id, window, filters, ("dim", dimension), scan, None if filtered else whole_hours)


_COLUMN_OF = {"countries": "country", "languages": "language", "screens": "screen", "pages": "path"}


def _column_values(snap: Snapshot, found: column_scans.Matched, dimension: str) -> dict[str, Totals]:
    """Events and users per value of an event-level breakdown, from the columns."""
    persons = found.column("person")
    if dimension in _COLUMN_OF:
        values = found.column(_COLUMN_OF[dimension])
        keep = values > 0
        if dimension == "pages":
            page_view = name_id(snap, PAGE_VIEW)
            keep &= found.column("name") == page_view
        counted = column_scans.per_value(values[keep], persons[keep])
        named = strings(snap, counted.keys())
        return {named[key]: total for key, total in counted.items()}
    column = {"browsers": "browser", "os": "os", "devices": "device"}[dimension]
    named = dict(snap.conn.execute(f"SELECT id, {column} FROM agents"))
    agents = found.column("agent")
    merged: dict[str, Totals] = defaultdict(Totals)
    for agent, total in column_scans.per_value(agents, persons).items():
        value = named.get(agent)
        if value is not None:
            merged[value].add(total)
    return dict(merged)


def _by_agent(digests: list[Digest], named: dict[int, str]) -> dict[str, Totals]:
    """Per browser, OS or device (`named` maps each user agent to one), from the digests' user agents."""
    found: dict[str, Totals] = defaultdict(Totals)
    for digest in digests:
        for agent, total in digest.agents.items():
            found[named[agent]].add(total)
    return found


def breakdown(snap: Snapshot, project_id: int, window: Window, filters: Filters, dimension: str,
              limit: int) -> list[Ranked]:
    if dimension in EVENT_DIMENSIONS:
        return _ranked(event_values(snap, project_id, window, filters, dimension), limit)
    return _session_breakdown(snap, project_id, window, filters, SESSION_DIMENSIONS[dimension], limit)


def _session_breakdown(snap: Snapshot, project_id: int, window: Window, filters: Filters, column: str,
                       limit: int) -> list[Ranked]:
    """Sessions and their users per value of a session column, over the sessions that started in the window
    (with a matching event in it, when filtered)."""
    def compute(start: int, end: int) -> dict[str, Totals]:
        sessions: dict[str, list[int]] = defaultdict(list)
        people: dict[str, list[int]] = defaultdict(list)
        for value, session_id, person_id in snap.conn.execute(
            f"SELECT v.value, s.id, s.person_id {SESSIONS_FROM} JOIN strings v ON v.id = s.{column}"
            f" WHERE {SESSIONS_WHERE}", (project_id, start, end),
        ):
            sessions[value].append(session_id)
            people[value].append(person_id)
        return {value: Totals(len(ids), BitMap(people[value]), BitMap(ids)) for value, ids in sessions.items()}

    parts = session_pieces(snap, project_id, window, ("column", column), compute)
    if filters != Filters():
        matched = matched_sessions(snap, project_id, window, filters)
        parts = (_matching(part, day, matched) for part, day in zip(parts, session_days(snap, project_id, window)))
    return _ranked(merge(parts), limit)


def _matching(part: dict[str, Totals], day: SessionDay, matched: BitMap) -> dict[str, Totals]:
    """Per value, only its sessions in `matched`, and their persons."""
    found = {}
    for value, total in part.items():
        sessions = total.sessions & matched
        if sessions:
            people = column_scans.bitmap(day.column(day.persons, day.positions(sessions)))
            found[value] = Totals(len(sessions), people, sessions)
    return found


_PROPERTY_KEYS = ("SELECT j.key, e.person_id {raw}, json_each(e.props) j WHERE {where} AND e.props IS NOT NULL")
_PROPERTY_VALUES = ("SELECT CAST(json_extract(e.props, ?) AS TEXT) AS v, e.person_id {raw}"
                    " WHERE {where} AND e.props IS NOT NULL AND v IS NOT NULL")


def _property_rows(snap: Snapshot, project_id: int, window: Window, filters: Filters, sql: str,
                   key: str | None, kind: tuple, limit: int) -> list[Ranked]:
    """Events and users per value of `sql` (a key or a key's value). Whole hours come from the day cache:
    with event columns, counted from them under any filters; without, unfiltered and under trait filters from
    per-person counts of every event, under other filters from that filter's own scans."""
    extra = [] if key is None else [json_path(key)]

    def scan(start: int, end: int, filters: Filters) -> dict[str, list[int]]:
        source, where, params = scan_sql(snap, project_id, start, end, filters)
        people: dict[str, list[int]] = defaultdict(list)
        for value, person_id in snap.conn.execute(sql.format(raw=source, where=where), [*extra, *params]):
            people[value].append(person_id)
        return people

    def counted(start: int, end: int) -> dict[str, Totals]:
        found = column_scans.matched(snap, project_id, start, end, filters)
        if found is not None:
            return _column_properties(found, key)
        return {value: Totals(len(ids), BitMap(ids)) for value, ids in scan(start, end, filters).items()}

    if column_scans.available(snap, project_id) or (filters != Filters() and not filters.traits_only):
        return _ranked(_by_value(snap, project_id, window, filters, kind, counted), limit)
    people = trait_people(snap, project_id, filters.traits) if filters.traits else None
    hours, raw = window.split()
    found: dict[str, Totals] = defaultdict(Totals)
    if hours is not None:
        for part in cached_spans(snap, project_id, hours, 0, ("tallies", *kind), lambda span: {
                value: Tally.of(ids) for value, ids in scan(span[0] * HOUR_MS, span[1] * HOUR_MS, Filters()).items()}):
            for value, tally in part.items():
                total = tally.totals(people)
                if total.events:
                    found[value].add(total)
    return _ranked(merge((counted(start, end) for start, end in raw), found), limit)


def _column_properties(found: column_scans.Matched, key: str | None) -> dict[str, Totals]:
    """Events and users per property key (`key` None) or per value of one key, from the columns."""
    persons = found.column("person")
    if key is None:
        return {name: Totals(len(rows), column_scans.bitmap(persons[rows])) for name, rows in found.keys()}
    rows, codes, values = found.prop(key)
    return {values[code]: total for code, total in column_scans.per_value(codes, persons[rows]).items()
            if values[code] is not None}  # a JSON null is no value


def property_keys(snap: Snapshot, project_id: int, window: Window, filters: Filters, limit: int) -> list[Ranked]:
    return _property_rows(snap, project_id, window, filters, _PROPERTY_KEYS, None, ("property keys",), limit)


def property_values(snap: Snapshot, project_id: int, window: Window, filters: Filters, key: str,
                    limit: int) -> list[Ranked]:
    return _property_rows(snap, project_id, window, filters, _PROPERTY_VALUES, key, ("property values", key), limit)


def _trait_rows(snap: Snapshot, project_id: int, window: Window, filters: Filters, sql: str, extra: list,
                limit: int) -> list[Ranked]:
    """Persons per value of `sql` over (person id, value) rows of the project's persons with traits, counting
    only the users of the window under the filters: the overview's `unique_users`, so that a row's count is
    the overview's `unique_users` once its value is added as a `trait.` filter."""
    users = totals(snap, project_id, window, filters).users
    found: dict[str, int] = defaultdict(int)
    if users:
        for person_id, value in snap.conn.execute(sql, [*extra, project_id]):
            if person_id in users:
                found[value] += 1
    rows = sorted(found.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [Ranked(value, count, count) for value, count in rows]


def trait_keys(snap: Snapshot, project_id: int, window: Window, filters: Filters, limit: int) -> list[Ranked]:
    """Trait keys of the users active in the window under the filters, by how many of them have it."""
    return _trait_rows(snap, project_id, window, filters,
                       "SELECT p.id, j.key FROM persons p, json_each(p.traits) j"
                       " WHERE p.project_id = ? AND p.traits IS NOT NULL", [], limit)


def trait_values(snap: Snapshot, project_id: int, window: Window, filters: Filters, key: str,
                 limit: int) -> list[Ranked]:
    """Values of one trait over the users active in the window under the filters, by how many of them have it
    (as `trait.KEY=VALUE` matches it: the value as text)."""
    return _trait_rows(snap, project_id, window, filters,
                       "SELECT p.id, CAST(json_extract(p.traits, ?) AS TEXT) AS v FROM persons p"
                       " WHERE p.project_id = ? AND p.traits IS NOT NULL AND v IS NOT NULL", [json_path(key)], limit)


_BOT_ROLLUPS = ("SELECT a.browser, d.events, d.user_set FROM hourly_dims d JOIN agents a ON a.id = d.value_id"
                f" WHERE d.project_id = ? AND d.dim = {DIM_AGENT} AND d.bot = 1 AND d.hour >= ? AND d.hour < ?")
_BOT_EVENTS = ("SELECT a.browser, e.person_id FROM events e JOIN agents a ON a.id = e.agent_id"
               " WHERE e.project_id = ? AND e.ts >= ? AND e.ts < ? AND a.is_bot = 1")


def bots(snap: Snapshot, project_id: int, window: Window, limit: int) -> list[Ranked]:
    """What every other number leaves out: events and users per crawler (the family its user agent parsed
    to). Whole hours from the bot rows of the user-agent rollups, read as they are (the day cache's
    fingerprints count no bot's events), the minutes at the edges from raw events."""
    found: dict[str, Totals] = defaultdict(Totals)
    hours, raw = window.split()
    if hours is not None:
        for value, events, user_set in snap.conn.execute(_BOT_ROLLUPS, (project_id, *hours)):
            found[value].add(Totals(events, BitMap.deserialize(user_set)))
    for start, end in raw:
        people: dict[str, list[int]] = defaultdict(list)
        for value, person_id in snap.conn.execute(_BOT_EVENTS, (project_id, start, end)):
            people[value].append(person_id)
        for value, ids in people.items():
            found[value].add(Totals(len(ids), BitMap(ids)))
    return _ranked(found, limit)
