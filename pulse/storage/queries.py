"""Analytics queries. Unfiltered counts come from the hourly rollups (whole hours) plus raw events for
the partial hours at the edges of a window; anything a rollup does not cover is read from raw events.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from array import array
from bisect import bisect_right
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from itertools import islice
from dataclasses import dataclass, field

import apsw
from pyroaring import BitMap

from pulse.storage.reader import checkpoint
from pulse.storage.rollups import DIM_AGENT, DIM_PAGE
from pulse.storage.rows import DAY_MS, HOUR_MS, PAGE_VIEW

LIVE_WINDOW_MS = 5 * 60_000


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open time range [start, end) in epoch milliseconds."""

    start: int
    end: int

    @property
    def previous(self) -> Window:
        return Window(self.start - (self.end - self.start), self.start)

    def split(self) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
        """(whole hours [h0, h1) or None, raw millisecond pieces that are not whole hours)."""
        first_hour = -(-self.start // HOUR_MS)
        last_hour = self.end // HOUR_MS
        if first_hour >= last_hour:
            return None, [(self.start, self.end)] if self.start < self.end else []
        raw = []
        if self.start < first_hour * HOUR_MS:
            raw.append((self.start, first_hour * HOUR_MS))
        if last_hour * HOUR_MS < self.end:
            raw.append((last_hour * HOUR_MS, self.end))
        return (first_hour, last_hour), raw


@dataclass(frozen=True, slots=True)
class Filters:
    """Conditions on events, ANDed. Each value is matched exactly."""

    event: str | None = None
    path: str | None = None
    referrer: str | None = None  # the referrer's domain
    utm_source: str | None = None  # of the event's session
    utm_medium: str | None = None
    utm_campaign: str | None = None
    browser: str | None = None
    os: str | None = None
    device: str | None = None
    props: tuple[tuple[str, str], ...] = ()  # event properties
    traits: tuple[tuple[str, str], ...] = ()  # person traits

    @property
    def rollup_ready(self) -> bool:
        """Whether the hourly rollups can answer (nothing but the event name is filtered)."""
        return self == Filters(event=self.event)

    @property
    def by_hour(self) -> bool:
        """Whether what the filters match in an hour is fixed by that hour's events and, for trait filters,
        by which of its users have the traits. UTM filters are not: a session's UTM values are those of
        its first page view, which a late event can change."""
        return self.utm_source is None and self.utm_medium is None and self.utm_campaign is None

    @property
    def traits_only(self) -> bool:
        """Whether person traits are all that is filtered: such filters are answered over whole hours from
        per-person counts of all the events (`People`, `Tally`), cut down to the persons with the traits."""
        return bool(self.traits) and self == Filters(traits=self.traits)


@dataclass(slots=True)
class Totals:
    events: int = 0
    users: BitMap = field(default_factory=BitMap)
    sessions: BitMap = field(default_factory=BitMap)

    def add(self, other: Totals) -> None:
        self.events += other.events
        self.users |= other.users
        self.sessions |= other.sessions


@dataclass(frozen=True, slots=True)
class Tally:
    """How many events each person had, as bit slices: person p had the sum of 2**j over the slices j that
    hold p. Cut down to any set of persons with one intersection per slice. The slices are kept serialized,
    at about a third of the memory of live sets, and read back in microseconds."""

    slices: tuple[bytes, ...]

    @classmethod
    def of(cls, people: list[int]) -> Tally:
        """From one person id per event."""
        once = BitMap(people)
        if len(once) == len(people):
            return cls((once.serialize(),))
        counts = Counter(people).items()
        top = max(count for _, count in counts).bit_length()
        return cls(tuple(BitMap([person for person, count in counts if count >> j & 1]).serialize()
                         for j in range(top)))

    def totals(self, people: BitMap | None = None) -> Totals:
        """Events and users, of everyone or of `people` only."""
        slices = [BitMap.deserialize(s) for s in self.slices]
        users = slices[0] if len(slices) == 1 else BitMap.union(*slices)
        if people is None:
            return Totals(sum(len(s) << j for j, s in enumerate(slices)), users)
        return Totals(sum(s.intersection_cardinality(people) << j for j, s in enumerate(slices)), users & people)


# -- raw events under filters ------------------------------------------------------------------------

_STRING = "(SELECT id FROM strings WHERE value = ?)"


def event_conditions(conn: apsw.Connection, project_id: int, start: int, end: int, filters: Filters
                     ) -> tuple[str, list]:
    """WHERE clause over `events e LEFT JOIN agents a`: the window, no bots, and the filters."""
    clauses = ["e.project_id = ?", "e.ts >= ?", "e.ts < ?", "coalesce(a.is_bot, 0) = 0"]
    params: list = [project_id, start, end]
    for column, value in (("name_id", filters.event), ("path_id", filters.path),
                          ("referrer_domain_id", filters.referrer)):
        if value is not None:
            clauses.append(f"e.{column} = {_STRING}")
            params.append(value)
    for column, value in (("browser", filters.browser), ("os", filters.os), ("device", filters.device)):
        if value is not None:
            clauses.append(f"a.{column} = ?")
            params.append(value)
    for column, value in (("utm_source_id", filters.utm_source), ("utm_medium_id", filters.utm_medium),
                          ("utm_campaign_id", filters.utm_campaign)):
        if value is not None:
            clauses.append(f"e.session_id IN (SELECT id FROM sessions WHERE project_id = ? AND {column} = {_STRING})")
            params += [project_id, value]
    for key, value in filters.props:
        clauses.append("CAST(json_extract(e.props, ?) AS TEXT) = ?")
        params += [_json_path(key), value]
    if filters.traits:
        clauses.append("e.person_id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(_trait_people(conn, project_id, filters.traits))))
    return " AND ".join(clauses), params


def _json_path(key: str) -> str:
    return '$."' + key.replace('"', '""') + '"'


_RAW_FROM = "FROM events e LEFT JOIN agents a ON a.id = e.agent_id"


def _scan(conn: apsw.Connection, project_id: int, start: int, end: int, filters: Filters) -> tuple[str, str, list]:
    """(FROM, WHERE, parameters) to read the events of [start, end) that match the filters in bulk.

    Events are stored about in time order, so when the span's ids are not mixed with many others' (late
    events), reading the table along its ids costs about a third of looking each row up from the index.
    """
    where, params = event_conditions(conn, project_id, start, end, filters)
    lowest, highest, count = conn.execute(
        "SELECT min(id), max(id), count(*) FROM events WHERE project_id = ? AND ts >= ? AND ts < ?",
        (project_id, start, end)).fetchone()  # from the index events_ts alone
    if count and highest - lowest < 2 * count:
        return (_RAW_FROM.replace("events e", "events e NOT INDEXED"), where + " AND e.id BETWEEN ? AND ?",
                [*params, lowest, highest])
    return _RAW_FROM, where, params


def _raw_totals(conn: apsw.Connection, project_id: int, start: int, end: int, filters: Filters) -> Totals:
    source, where, params = _scan(conn, project_id, start, end, filters)
    found = Totals()
    users, sessions = [], []
    for person_id, session_id in conn.execute(f"SELECT e.person_id, e.session_id {source} WHERE {where}", params):
        found.events += 1
        users.append(person_id)
        if session_id is not None:
            sessions.append(session_id)
    found.users.update(users)
    found.sessions.update(sessions)
    return found


# -- rollups --------------------------------------------------------------------------------------------


def _name_id(conn: apsw.Connection, name: str | None) -> int | None:
    """The interned id of an event name; 0 (every event) for None; -1 when no such event exists."""
    if name is None:
        return 0
    row = conn.execute("SELECT id FROM strings WHERE value = ?", (name,)).fetchone()
    return -1 if row is None else row[0]


def _hourly(conn: apsw.Connection, project_id: int, hours: tuple[int, int], name_id: int) -> dict[int, Totals]:
    """Per hour, the rollup of one event name (0: every event), bots left out."""
    found: dict[int, Totals] = {}
    for hour, events, user_set, session_set in conn.execute(
        "SELECT hour, events, user_set, session_set FROM hourly"
        " WHERE project_id = ? AND name_id = ? AND bot = 0 AND hour >= ? AND hour < ?",
        (project_id, name_id, *hours),
    ):
        total = found.get(hour)
        if total is None:
            total = found[hour] = Totals()
        total.add(Totals(events, BitMap.deserialize(user_set), BitMap.deserialize(session_set)))
    return found


class DayCache:
    """Unions of whole UTC days of hourly rollup rows, kept while the day's rows are unchanged.

    Rollup rows only ever gain events (new rows) or merge (compaction keeps the sum), so the sum of a
    day's events says whether its union can have changed: a cached day is reused while that sum is the
    same. The sums come from the index hourly_events without reading the sets. Readers on several
    threads share the cache; cached values are never mutated.
    """

    def __init__(self, max_bytes: int = 96 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes  # roughly: two bytes per id held, the least recently used go first
        self.bytes = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[float, object, int]] = OrderedDict()

    def get(self, key: tuple, fingerprint: float) -> object | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] != fingerprint:
                return None
            self._entries.move_to_end(key)
            return found[1]

    def put(self, key: tuple, fingerprint: float, value: object) -> None:
        size = _size(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self._entries[key] = (fingerprint, value, size)
            self.bytes += size
            while self.bytes > self.max_bytes and self._entries:
                self.bytes -= self._entries.popitem(last=False)[1][2]


def _size(value: object) -> int:
    if isinstance(value, Totals):
        return 64 + 2 * (len(value.users) + len(value.sessions))
    if isinstance(value, BitMap):
        return 64 + 2 * len(value)
    if isinstance(value, Digest):
        return _size(value.total) + sum(_size(part) for part in (value.hours, value.names, value.pages, value.agents))
    if isinstance(value, Tally):
        return 64 + sum(len(s) + 40 for s in value.slices)
    if isinstance(value, People):
        return 64 + 16 * sum(len(persons) for persons, _ in value.sessions.values()) + sum(
            _size(part) for part in (value.hours, value.names, value.pages, value.agents))
    if isinstance(value, SessionDay):
        return 64 + 28 * len(value.ids)
    if isinstance(value, dict):
        return 64 + sum(_size(item) for item in value.values())
    return 64


DAYS = DayCache()


def _whole_days(hours: tuple[int, int]) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """(hour ranges outside whole UTC days, the whole days [d0, d1) or None)."""
    first, last = -(-hours[0] // 24), hours[1] // 24
    if first >= last:
        return [hours], None
    edges = [r for r in ((hours[0], first * 24), (last * 24, hours[1])) if r[0] < r[1]]
    return edges, (first, last)


def _spans(conn: apsw.Connection, project_id: int, hours: tuple[int, int], name_id: int, kind: tuple,
           compute: Callable[[tuple[int, int]], object],
           extra: Callable[[tuple[int, int]], object] | None = None) -> Iterator[object]:
    """`compute(span)` for the whole days in `hours` and the single hours around them, from the day cache.

    A span's fingerprint is its events of `name_id` (0: every event, which also covers the dimension
    rollups written in the same commits), with `extra(span)` when given; a span without events is skipped.
    """
    edges, days = _whole_days(hours)
    spans = [(day * 24, day * 24 + 24) for day in range(*days)] if days is not None else []
    spans += [(hour, hour + 1) for start, end in edges for hour in range(start, end)]
    fingerprints = dict(conn.execute(
        "SELECT hour, total(events) FROM hourly WHERE project_id = ? AND name_id = ? AND bot = 0"
        " AND hour >= ? AND hour < ? GROUP BY 1", (project_id, name_id, *hours)))
    for span in spans:
        checkpoint()  # cached spans run no SQL: the time limit, or a stop, ends the read here
        fingerprint = sum(fingerprints.get(hour, 0) for hour in range(*span))
        if not fingerprint:
            continue
        if extra is not None:
            fingerprint = (fingerprint, extra(span))
        key = (conn.filename, project_id, *kind, *span)
        cached = DAYS.get(key, fingerprint)
        if cached is None:
            cached = compute(span)
            DAYS.put(key, fingerprint, cached)
        yield cached


def _summed(conn: apsw.Connection, project_id: int, hours: tuple[int, int], name_id: int) -> Totals:
    """The rollups of one event name (0: all) summed over whole hours."""
    def compute(span: tuple[int, int]) -> Totals:
        total = Totals()
        for hour in _hourly(conn, project_id, span, name_id).values():
            total.add(hour)
        return total

    found = Totals()
    for cached in _spans(conn, project_id, hours, name_id, ("name", name_id), compute):
        found.add(cached)
    return found


def _filtered_spans(conn: apsw.Connection, project_id: int, hours: tuple[int, int], filters: Filters, kind: tuple,
                    compute: Callable[[int, int], object]) -> Iterator[object]:
    """`compute(start_ms, end_ms)` from raw events under `filters` (which must be `by_hour`), per whole day and
    single hour of `hours` from the day cache. Under trait filters a span is also told apart by which of its
    users have the traits now, so a trait that changes later is never answered from an older count."""
    people = _trait_people(conn, project_id, filters.traits) if filters.traits else None

    def who(span: tuple[int, int]) -> bytes:
        return hashlib.blake2b((_summed(conn, project_id, span, 0).users & people).serialize(), digest_size=16).digest()

    return _spans(conn, project_id, hours, 0, ("filtered", filters, *kind),
                  lambda span: compute(span[0] * HOUR_MS, span[1] * HOUR_MS), who if people is not None else None)


def _trait_people(conn: apsw.Connection, project_id: int, traits: tuple[tuple[str, str], ...]) -> BitMap:
    """The persons of the project that have every trait given; kept until the writer next merges traits
    into one of the project's persons."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"traits:{project_id}",)).fetchone()
    generation = 0 if row is None else row[0]
    key = (conn.filename, project_id, "trait people", traits)
    found = DAYS.get(key, generation)
    if found is None:
        sql = "SELECT id FROM persons WHERE project_id = ?"
        params: list = [project_id]
        for name, value in traits:
            sql += " AND CAST(json_extract(traits, ?) AS TEXT) = ?"
            params += [_json_path(name), value]
        found = BitMap(row[0] for row in conn.execute(sql, params))
        DAYS.put(key, generation, found)
    return found


def _merge(parts: Iterator[dict], into: dict | None = None) -> dict:
    """Add up {value: Totals} parts into fresh totals (cached parts are never changed)."""
    found: dict = defaultdict(Totals) if into is None else into
    for part in parts:
        for value, total in part.items():
            found[value].add(total)
    return found


def _by_value(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, kind: tuple,
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
    elif filters.by_hour:
        found = _merge(_filtered_spans(conn, project_id, hours, filters, kind, scan))
    else:
        raw = [(window.start, window.end)]
    return _merge((scan(start, end) for start, end in raw), found)


def _named_hours(conn: apsw.Connection, project_id: int, hours: tuple[int, int], only: str | None
                 ) -> dict[str, Totals]:
    """Per event name, events and users over whole hours (rows read, no cache)."""
    found: dict[str, Totals] = defaultdict(Totals)
    for name, events, user_set in conn.execute(
        "SELECT s.value, h.events, h.user_set FROM hourly h JOIN strings s ON s.id = h.name_id"
        " WHERE h.project_id = ? AND h.name_id != 0 AND h.bot = 0 AND h.hour >= ? AND h.hour < ?"
        + (" AND s.value = ?" if only is not None else ""),
        (project_id, *hours, *([only] if only is not None else [])),
    ):
        found[name].add(Totals(events, BitMap.deserialize(user_set)))
    return found


def _named(conn: apsw.Connection, project_id: int, hours: tuple[int, int], only: str | None
           ) -> dict[str, Totals]:
    """Per event name, events and users over whole hours."""
    name_id = 0 if only is None else _name_id(conn, only)
    found: dict[str, Totals] = defaultdict(Totals)
    for cached in _spans(conn, project_id, hours, name_id, ("names", only),
                         lambda span: dict(_named_hours(conn, project_id, span, only))):
        for name, total in cached.items():
            found[name].add(total)
    return found


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


def _digest(conn: apsw.Connection, project_id: int, start: int, end: int, filters: Filters) -> Digest:
    source, where, params = _scan(conn, project_id, start, end, filters)
    page_view = _name_id(conn, PAGE_VIEW)
    hour_users: dict[int, list[int]] = defaultdict(list)
    hour_sessions: dict[int, list[int]] = defaultdict(list)
    names: dict[int, list[int]] = defaultdict(list)
    pages: dict[int, list[int]] = defaultdict(list)
    agents: dict[int, list[int]] = defaultdict(list)
    for ts, name_id, person_id, session_id, path_id, agent_id in conn.execute(
        f"SELECT e.ts, e.name_id, e.person_id, e.session_id, e.path_id, e.agent_id {source} WHERE {where}", params
    ):
        hour = ts // HOUR_MS
        hour_users[hour].append(person_id)
        if session_id is not None:
            hour_sessions[hour].append(session_id)
        names[name_id].append(person_id)
        if name_id == page_view and path_id is not None:
            pages[path_id].append(person_id)
        agents[agent_id].append(person_id)
    hours = {hour: Totals(len(people), BitMap(people), BitMap(hour_sessions[hour]))
             for hour, people in hour_users.items()}
    strings = _strings(conn, names.keys() | pages.keys())
    return Digest(_summed_hours(hours), hours,
                  {strings[i]: Totals(len(people), BitMap(people)) for i, people in names.items()},
                  {strings[i]: Totals(len(people), BitMap(people)) for i, people in pages.items()},
                  {i: Totals(len(people), BitMap(people)) for i, people in agents.items()})


_PAIR = 64  # a (person, session) pair as one integer while it is counted: person << 64 | session


@dataclass(frozen=True, slots=True)
class People:
    """Per person, what all the non-bot events of a span add to every event-level number: in all per hour,
    per event name, per page viewed and per user agent, with each hour's (person, session) pairs. Cut down
    to the persons that have some traits (`digest`), it is what a raw scan under those trait filters finds."""

    hours: dict[int, Tally]
    sessions: dict[int, tuple[array, array]]  # per hour, its distinct (person, session) pairs
    names: dict[str, Tally]
    pages: dict[str, Tally]
    agents: dict[int, Tally]

    def digest(self, people: BitMap) -> Digest:
        hours = {}
        for hour, tally in self.hours.items():
            found = tally.totals(people)
            if found.events:
                persons, sessions = self.sessions[hour]
                found.sessions = BitMap([session for person, session in zip(persons, sessions) if person in people])
                hours[hour] = found
        return Digest(_summed_hours(hours), hours, _cut(self.names, people), _cut(self.pages, people),
                      _cut(self.agents, people))


def _cut(tallies: dict, people: BitMap) -> dict:
    found = {}
    for key, tally in tallies.items():
        total = tally.totals(people)
        if total.events:
            found[key] = total
    return found


def _summed_hours(hours: dict[int, Totals]) -> Totals:
    total = Totals()
    if hours:
        total.events = sum(t.events for t in hours.values())
        total.users = BitMap.union(*(t.users for t in hours.values()))
        total.sessions = BitMap.union(*(t.sessions for t in hours.values()))
    return total


def _people(conn: apsw.Connection, project_id: int, start: int, end: int) -> People:
    source, where, params = _scan(conn, project_id, start, end, Filters())
    page_view = _name_id(conn, PAGE_VIEW)
    hours: dict[int, list[int]] = defaultdict(list)
    pairs: dict[int, list[int]] = defaultdict(list)
    names: dict[int, list[int]] = defaultdict(list)
    pages: dict[int, list[int]] = defaultdict(list)
    agents: dict[int, list[int]] = defaultdict(list)
    for ts, name_id, person_id, session_id, path_id, agent_id in conn.execute(
        f"SELECT e.ts, e.name_id, e.person_id, e.session_id, e.path_id, e.agent_id {source} WHERE {where}", params
    ):
        hour = ts // HOUR_MS
        hours[hour].append(person_id)
        if session_id is not None:
            pairs[hour].append(person_id << _PAIR | session_id)
        names[name_id].append(person_id)
        if name_id == page_view and path_id is not None:
            pages[path_id].append(person_id)
        agents[agent_id].append(person_id)
    strings = _strings(conn, names.keys() | pages.keys())
    return People({hour: Tally.of(people) for hour, people in hours.items()},
                  {hour: _unpaired(pairs.get(hour, ())) for hour in hours},
                  {strings[i]: Tally.of(people) for i, people in names.items()},
                  {strings[i]: Tally.of(people) for i, people in pages.items()},
                  {i: Tally.of(people) for i, people in agents.items()})


def _unpaired(pairs: list[int]) -> tuple[array, array]:
    """The distinct (person, session) pairs, as a column of persons and one of sessions."""
    persons, sessions = array("q"), array("q")
    mask = (1 << _PAIR) - 1
    for pair in sorted(set(pairs)):
        persons.append(pair >> _PAIR)
        sessions.append(pair & mask)
    return persons, sessions


def cache_for_filters(conn: apsw.Connection, project_id: int, window: Window) -> None:
    """Fill the day cache with what any trait filter is answered from (the start-up warm-up): the `People`
    of the window's whole hours, and its sessions by start day (`SessionDay`)."""
    hours, _ = window.split()
    if hours is not None:
        for _ in _people_spans(conn, project_id, hours):
            pass
    for _ in _session_days(conn, project_id, window):
        pass


def _people_spans(conn: apsw.Connection, project_id: int, hours: tuple[int, int]) -> Iterator[People]:
    return _spans(conn, project_id, hours, 0, ("people",),
                  lambda span: _people(conn, project_id, span[0] * HOUR_MS, span[1] * HOUR_MS))


def _filtered_digests(conn: apsw.Connection, project_id: int, hours: tuple[int, int], filters: Filters
                      ) -> Iterator[Digest]:
    """Digests of the whole days and single hours in `hours` under `filters` (which must be `by_hour`)."""
    if filters.traits_only:
        people = _trait_people(conn, project_id, filters.traits)

        def compute(start: int, end: int) -> Digest:
            found = next(_people_spans(conn, project_id, (start // HOUR_MS, end // HOUR_MS)), None)
            return Digest(Totals(), {}, {}, {}, {}) if found is None else found.digest(people)
    else:
        def compute(start: int, end: int) -> Digest:
            return _digest(conn, project_id, start, end, filters)
    return _filtered_spans(conn, project_id, hours, filters, ("digest",), compute)


def _strings(conn: apsw.Connection, ids) -> dict[int, str]:
    return dict(conn.execute("SELECT id, value FROM strings WHERE id IN (SELECT value FROM json_each(?))",
                             (json.dumps(list(ids)),)))


def _digests(conn: apsw.Connection, project_id: int, window: Window, filters: Filters) -> Iterator[Digest]:
    """Digests that together cover the window: whole hours from the day cache (for filters it can hold),
    the rest scanned now."""
    hours, raw = window.split()
    if hours is not None and filters.by_hour:
        yield from _filtered_digests(conn, project_id, hours, filters)
    elif hours is not None:
        raw = [(window.start, window.end)]
    for start, end in raw:
        yield _digest(conn, project_id, start, end, filters)


def totals(conn: apsw.Connection, project_id: int, window: Window, filters: Filters = Filters()) -> Totals:
    """Events, and the exact sets of users and sessions, of the non-bot events in the window."""
    found = Totals()
    if not filters.rollup_ready:
        for digest in _digests(conn, project_id, window, filters):
            found.add(digest.total)
        return found
    name_id = _name_id(conn, filters.event)
    if name_id < 0:
        return found
    hours, raw = window.split()
    if hours is not None:
        found.add(_summed(conn, project_id, hours, name_id))
    for start, end in raw:
        found.add(_raw_totals(conn, project_id, start, end, filters))
    return found


# -- overview ---------------------------------------------------------------------------------------


def _totals_and_names(conn: apsw.Connection, project_id: int, window: Window, filters: Filters
                      ) -> tuple[Totals, dict[str, Totals]]:
    """Events, users and sessions in the window, and events and users per event name, in one pass."""
    if not filters.rollup_ready:
        found = Totals()
        names: dict[str, Totals] = defaultdict(Totals)
        for digest in _digests(conn, project_id, window, filters):
            found.add(digest.total)
            _merge([digest.names], names)
        return found, names
    name_id = _name_id(conn, filters.event)
    if name_id < 0:
        return Totals(), {}
    hours, raw = window.split()
    found = _summed(conn, project_id, hours, name_id) if hours is not None else Totals()  # fresh, safe to add to
    names = _named(conn, project_id, hours, filters.event) if hours is not None else defaultdict(Totals)
    for start, end in raw:
        digest = _digest(conn, project_id, start, end, filters)
        found.add(digest.total)
        _merge([digest.names], names)
    return found, names


def _top_events(conn: apsw.Connection, project_id: int, window: Window, filters: Filters) -> dict[str, Totals]:
    """Per event name: events and the exact users in the window."""
    return _totals_and_names(conn, project_id, window, filters)[1]


# -- sessions, by the day they started ------------------------------------------------------------------

_SESSIONS_FROM = "FROM sessions s LEFT JOIN agents a ON a.id = s.agent_id"
_SESSIONS_WHERE = "s.project_id = ? AND s.first_ts >= ? AND s.first_ts < ? AND coalesce(a.is_bot, 0) = 0"


def _session_pieces(conn: apsw.Connection, project_id: int, window: Window, kind: tuple,
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
    generations = dict(conn.execute(
        "SELECT day, generation FROM session_days WHERE project_id = ? AND day >= ? AND day < ?",
        (project_id, first, last)))
    for day in range(first, last):
        checkpoint()
        generation = generations.get(day)
        if generation is None:
            continue
        key = (conn.filename, project_id, "sessions", *kind, day)
        cached = DAYS.get(key, generation)
        if cached is None:
            cached = compute(day * DAY_MS, day * DAY_MS + DAY_MS)
            DAYS.put(key, generation, cached)
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

    def positions(self, sessions: BitMap) -> list[int]:
        """Where each of `sessions` (all in ids) is in the arrays."""
        rank = self.ids.rank
        return [rank(session_id) - 1 for session_id in sessions]


def _session_day(conn: apsw.Connection, project_id: int, start: int, end: int) -> SessionDay:
    ids, bounced = BitMap(), BitMap()
    durations, pageviews, persons = array("q"), array("q"), array("q")
    for session_id, bounce, duration, pages, person_id in conn.execute(
        f"SELECT s.id, s.events = 1, s.last_ts - s.first_ts, s.pageviews, s.person_id {_SESSIONS_FROM}"
        f" WHERE {_SESSIONS_WHERE} ORDER BY s.id", (project_id, start, end)
    ):
        ids.add(session_id)
        if bounce:
            bounced.add(session_id)
        durations.append(duration)
        pageviews.append(pages)
        persons.append(person_id)
    return SessionDay(ids, bounced, durations, pageviews, persons)


def _session_days(conn: apsw.Connection, project_id: int, window: Window) -> Iterator[SessionDay]:
    return _session_pieces(conn, project_id, window, ("table",),
                           lambda start, end: _session_day(conn, project_id, start, end))


def _matched_sessions(conn: apsw.Connection, project_id: int, window: Window, filters: Filters) -> BitMap:
    """The sessions with an event in the window that matches the filters."""
    return totals(conn, project_id, window, filters).sessions


def _session_sums(conn: apsw.Connection, project_id: int, window: Window, filters: Filters,
                  matched: BitMap | None = None) -> tuple[int, int, int, int]:
    """(sessions, bounces, total duration ms, total page views) of the sessions that started in the window
    (with a matching event in it, when filtered: `matched`, if the caller has it already)."""
    found = [0, 0, 0, 0]
    if filters != Filters():
        if matched is None:
            matched = _matched_sessions(conn, project_id, window, filters)
        for day in _session_days(conn, project_id, window):
            sessions = day.ids & matched
            positions = day.positions(sessions)
            found[0] += len(sessions)
            found[1] += len(day.bounced & sessions)
            found[2] += sum(day.durations[i] for i in positions)
            found[3] += sum(day.pageviews[i] for i in positions)
        return tuple(found)
    sql = (f"SELECT count(*), coalesce(sum(s.events = 1), 0), coalesce(sum(s.last_ts - s.first_ts), 0),"
           f" coalesce(sum(s.pageviews), 0) {_SESSIONS_FROM} WHERE {_SESSIONS_WHERE}")
    for sums in _session_pieces(conn, project_id, window, ("sums",),
                                lambda start, end: conn.execute(sql, (project_id, start, end)).fetchone()):
        for i, value in enumerate(sums):
            found[i] += value
    return tuple(found)


def _session_stats(sums: tuple[int, int, int, int]) -> dict:
    """Bounce rate, average duration and pages per session from _session_sums."""
    count, bounces, duration, pages = sums
    return {
        "bounce_rate": round(bounces / count, 4) if count else 0.0,
        "avg_session_seconds": round(duration / count / 1000, 1) if count else 0.0,
        "pages_per_session": round(pages / count, 2) if count else 0.0,
    }


def _period(conn: apsw.Connection, project_id: int, window: Window, filters: Filters) -> dict:
    found, names = _totals_and_names(conn, project_id, window, filters)
    top = max(names.items(), key=lambda item: (item[1].events, item[0]), default=None)
    days = max((window.end - window.start) / DAY_MS, 1 / 24)
    return {
        "events": found.events,
        "unique_users": len(found.users),
        "sessions": len(found.sessions),
        **_session_stats(_session_sums(conn, project_id, window, filters, found.sessions)),
        "top_event": None if top is None else {"event": top[0], "count": top[1].events},
        "daily_average": round(found.events / days, 1),
        "distinct_events": len(names),
    }


def overview(conn: apsw.Connection, project_id: int, window: Window, now_ms: int,
             filters: Filters = Filters()) -> dict:
    current = _period(conn, project_id, window, filters)
    live = _raw_totals(conn, project_id, now_ms - LIVE_WINDOW_MS, now_ms + 1, filters)
    return {**current, "live_visitors": len(live.users), "previous": _period(conn, project_id, window.previous, filters)}


# -- time series ------------------------------------------------------------------------------------


def timeseries(conn: apsw.Connection, project_id: int, bounds: list[int], filters: Filters) -> list[dict]:
    """Events, users and sessions per bucket; bounds are the bucket edges [b0, b1, …, bn] in ms."""
    buckets = [Totals() for _ in range(len(bounds) - 1)]
    window = Window(bounds[0], bounds[-1])
    hours, _ = window.split()
    covered: set[int] = set()  # hours answered by the rollups or the day cache
    if hours is not None and (filters.rollup_ready or filters.by_hour):
        if filters.rollup_ready:
            name_id = _name_id(conn, filters.event)
            if name_id < 0:
                return [_bucket_row(b) for b in buckets]
            per_hour = _hourly(conn, project_id, hours, name_id)
        else:
            per_hour = {}
            for digest in _filtered_digests(conn, project_id, hours, filters):
                per_hour.update(digest.hours)
        for hour in range(*hours):  # whole hours inside one bucket (an hour without a rollup row had no events)
            if hour * HOUR_MS + HOUR_MS <= bounds[bisect_right(bounds, hour * HOUR_MS)]:
                covered.add(hour)
        for hour, total in per_hour.items():
            if hour in covered:
                buckets[bisect_right(bounds, hour * HOUR_MS) - 1].add(total)
    for start, end in _uncovered(window, covered):  # the rest from raw events, range by range
        where, params = event_conditions(conn, project_id, start, end, filters)
        for ts, person_id, session_id in conn.execute(
            f"SELECT e.ts, e.person_id, e.session_id {_RAW_FROM} WHERE {where}", params
        ):
            bucket = buckets[bisect_right(bounds, ts) - 1]
            bucket.events += 1
            bucket.users.add(person_id)
            if session_id is not None:
                bucket.sessions.add(session_id)
    return [_bucket_row(b) for b in buckets]


def project_summary(conn: apsw.Connection, project_id: int, today: Window, hours: list[int]) -> dict:
    """Events since local midnight, and events per hour for the bounds given (the projects list)."""
    return {"events_today": totals(conn, project_id, today).events,
            "hourly": [row["events"] for row in timeseries(conn, project_id, hours, Filters())]}


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


def _bucket_row(total: Totals) -> dict:
    return {"events": total.events, "unique_users": len(total.users), "sessions": len(total.sessions)}


# -- breakdowns -------------------------------------------------------------------------------------


def top_events(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, limit: int) -> list[dict]:
    return _ranked(_top_events(conn, project_id, window, filters), limit)


# event-level breakdowns: what is grouped, and which events count
EVENT_DIMENSIONS = {
    "pages": ("ps.value", "JOIN strings ps ON ps.id = e.path_id", f"e.name_id = {_STRING}", [PAGE_VIEW]),
    "browsers": ("a.browser", "", "a.browser IS NOT NULL", []),
    "os": ("a.os", "", "a.os IS NOT NULL", []),
    "devices": ("a.device", "", "a.device IS NOT NULL", []),
}
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
}


def _ranked(found: dict[str, Totals], limit: int) -> list[dict]:
    rows = [{"value": value, "count": t.events, "unique_users": len(t.users)} for value, t in found.items()]
    rows.sort(key=lambda r: (-r["count"], r["value"]))
    return rows[:limit]


def _event_breakdown(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, dimension: str,
                     limit: int) -> list[dict]:
    """Unfiltered: whole hours from hourly_dims, the minutes at the edges from raw events. Filtered: digests."""
    if filters != Filters():
        digests = list(_digests(conn, project_id, window, filters))
        if dimension == "pages":
            return _ranked(_merge(digest.pages for digest in digests), limit)
        column = {"browsers": "browser", "os": "os", "devices": "device"}[dimension]
        named = dict(conn.execute(f"SELECT id, {column} FROM agents"))
        return _ranked(_by_agent(digests, named), limit)
    value_sql, join, condition, extra = EVENT_DIMENSIONS[dimension]

    def scan(start: int, end: int) -> dict[str, Totals]:
        where, params = event_conditions(conn, project_id, start, end, filters)
        people: dict[str, list[int]] = defaultdict(list)
        for value, person_id in conn.execute(
            f"SELECT {value_sql}, e.person_id {_RAW_FROM} {join} WHERE {where} AND {condition}", [*params, *extra]
        ):
            people[value].append(person_id)
        return {value: Totals(len(ids), BitMap(ids)) for value, ids in people.items()}

    def rolled_up(span: tuple[int, int]) -> dict[str, Totals]:
        values: dict[str, Totals] = defaultdict(Totals)
        for value, events, user_set in conn.execute(_DIM_ROLLUPS[dimension], (project_id, *span)):
            values[value].add(Totals(events, BitMap.deserialize(user_set)))
        return dict(values)

    def whole_hours(hours: tuple[int, int]) -> dict[str, Totals]:
        return _merge(_spans(conn, project_id, hours, 0, ("dim", dimension), rolled_up))

    return _ranked(_by_value(conn, project_id, window, filters, ("dim", dimension), scan, whole_hours), limit)


def _by_agent(digests: list[Digest], named: dict[int, str]) -> dict[str, Totals]:
    """Per browser, OS or device (`named` maps each user agent to one), from the digests' user agents."""
    found: dict[str, Totals] = defaultdict(Totals)
    for digest in digests:
        for agent, total in digest.agents.items():
            found[named[agent]].add(total)
    return found


def breakdown(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, dimension: str,
              limit: int) -> list[dict]:
    if dimension in EVENT_DIMENSIONS:
        return _event_breakdown(conn, project_id, window, filters, dimension, limit)
    return _session_breakdown(conn, project_id, window, filters, SESSION_DIMENSIONS[dimension], limit)


def _session_breakdown(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, column: str,
                       limit: int) -> list[dict]:
    """Sessions and their users per value of a session column, over the sessions that started in the window
    (with a matching event in it, when filtered)."""
    def compute(start: int, end: int) -> dict[str, Totals]:
        sessions: dict[str, list[int]] = defaultdict(list)
        people: dict[str, list[int]] = defaultdict(list)
        for value, session_id, person_id in conn.execute(
            f"SELECT v.value, s.id, s.person_id {_SESSIONS_FROM} JOIN strings v ON v.id = s.{column}"
            f" WHERE {_SESSIONS_WHERE}", (project_id, start, end),
        ):
            sessions[value].append(session_id)
            people[value].append(person_id)
        return {value: Totals(len(ids), BitMap(people[value]), BitMap(ids)) for value, ids in sessions.items()}

    parts = _session_pieces(conn, project_id, window, ("column", column), compute)
    if filters != Filters():
        matched = _matched_sessions(conn, project_id, window, filters)
        parts = (_matching(part, day, matched) for part, day in zip(parts, _session_days(conn, project_id, window)))
    return _ranked(_merge(parts), limit)


def _matching(part: dict[str, Totals], day: SessionDay, matched: BitMap) -> dict[str, Totals]:
    """Per value, only its sessions in `matched`, and their persons."""
    found = {}
    for value, total in part.items():
        sessions = total.sessions & matched
        if sessions:
            people = BitMap(day.persons[i] for i in day.positions(sessions))
            found[value] = Totals(len(sessions), people, sessions)
    return found


# -- lists: sessions, users, events, properties ---------------------------------------------------------


def _cursor(cursor: tuple[int, int] | None) -> tuple[str, list]:
    return ("", []) if cursor is None else (" AND (ts_col < ? OR (ts_col = ? AND id_col < ?))",
                                            [cursor[0], cursor[0], cursor[1]])


def sessions(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, limit: int,
             cursor: tuple[int, int] | None) -> dict:
    """Aggregates of the sessions that started in the window, and a page of them, newest first."""
    sql = (
        "SELECT s.id, s.session_key, p.distinct_id, s.first_ts, s.last_ts, s.events, s.pageviews, en.value, ex.value,"
        " rf.value, us.value, a.browser, a.os, a.device FROM sessions s"
        " JOIN persons p ON p.id = s.person_id LEFT JOIN agents a ON a.id = s.agent_id"
        " LEFT JOIN strings en ON en.id = s.entry_path_id LEFT JOIN strings ex ON ex.id = s.exit_path_id"
        " LEFT JOIN strings rf ON rf.id = s.referrer_id LEFT JOIN strings us ON us.id = s.utm_source_id"
        " WHERE s.project_id = ? AND s.first_ts >= ? AND s.first_ts < ? AND coalesce(a.is_bot, 0) = 0"
    )
    page, page_params = _cursor(cursor)
    matched = None if filters == Filters() else _matched_sessions(conn, project_id, window, filters)
    cursor = conn.execute(
        sql + page.replace("ts_col", "s.first_ts").replace("id_col", "s.id") + " ORDER BY s.first_ts DESC, s.id DESC",
        [project_id, window.start, window.end, *page_params])
    newest = cursor if matched is None else (row for row in cursor if row[0] in matched)  # with a matching event
    rows = list(islice(newest, limit + 1))
    cursor.close()
    found = [
        {"session_id": key, "distinct_id": distinct_id, "first_ts": first, "last_ts": last,
         "duration_seconds": round((last - first) / 1000, 1), "events": events, "pageviews": pageviews,
         "entry_page": entry, "exit_page": exit_page, "referrer": referrer, "utm_source": source,
         "browser": browser, "os": os_name, "device": device}
        for _, key, distinct_id, first, last, events, pageviews, entry, exit_page, referrer, source, browser, os_name,
        device in rows[:limit]
    ]
    more = len(rows) > limit
    sums = _session_sums(conn, project_id, window, filters, matched)
    return {
        "aggregates": {"sessions": sums[0], **_session_stats(sums)},
        "rows": found,
        "next_cursor": f"{rows[limit - 1][3]}.{rows[limit - 1][0]}" if more else None,
    }


def _identified(alias: str) -> str:
    return (f"({alias}.traits IS NOT NULL OR EXISTS (SELECT 1 FROM person_ids i WHERE i.project_id = {alias}.project_id"
            f" AND i.person_id = {alias}.id AND i.distinct_id != {alias}.distinct_id))")


def users(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, limit: int,
          cursor: tuple[int, int] | None) -> dict:
    """Identified users (with traits, or linked from an anonymous id) active in the window, last seen first."""
    sql = (f"SELECT p.id, p.distinct_id, p.traits, p.first_seen, p.last_seen, p.event_count FROM persons p"
           f" WHERE p.project_id = ? AND p.last_seen >= ? AND p.first_seen < ? AND {_identified('p')}")
    params: list = [project_id, window.start, window.end]
    for key, value in filters.traits:
        sql += " AND CAST(json_extract(p.traits, ?) AS TEXT) = ?"
        params += [_json_path(key), value]
    page, page_params = _cursor(cursor)
    rows = list(conn.execute(
        sql + page.replace("ts_col", "p.last_seen").replace("id_col", "p.id") + " ORDER BY p.last_seen DESC, p.id DESC"
        " LIMIT ?", [*params, *page_params, limit + 1]))
    return {
        "rows": [{"distinct_id": distinct_id, "traits": _json(traits), "first_seen": first, "last_seen": last,
                  "events": count} for _, distinct_id, traits, first, last, count in rows[:limit]],
        "next_cursor": f"{rows[limit - 1][4]}.{rows[limit - 1][0]}" if len(rows) > limit else None,
    }


_EVENT_COLUMNS = (
    "SELECT e.id, e.uuid, n.value, e.ts, p.distinct_id, pa.value, u.value, r.value, e.props, a.browser, a.os, a.device"
    " FROM events e LEFT JOIN agents a ON a.id = e.agent_id JOIN strings n ON n.id = e.name_id"
    " JOIN persons p ON p.id = e.person_id LEFT JOIN strings pa ON pa.id = e.path_id"
    " LEFT JOIN strings u ON u.id = e.url_id LEFT JOIN strings r ON r.id = e.referrer_id"
)


def _event_rows(rows: list[tuple], limit: int) -> dict:
    return {
        "rows": [{"uuid": str(_uuid(uid)), "event": name, "ts": ts, "distinct_id": distinct_id, "path": path,
                  "page_url": url, "referrer": referrer, "properties": _json(props), "browser": browser, "os": os_name,
                  "device": device}
                 for _, uid, name, ts, distinct_id, path, url, referrer, props, browser, os_name, device in rows[:limit]],
        "next_cursor": f"{rows[limit - 1][3]}.{rows[limit - 1][0]}" if len(rows) > limit else None,
    }


def events(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, limit: int,
           cursor: tuple[int, int] | None) -> dict:
    """Raw events in the window that match the filters, newest first."""
    where, params = event_conditions(conn, project_id, window.start, window.end, filters)
    page, page_params = _cursor(cursor)
    rows = list(conn.execute(
        f"{_EVENT_COLUMNS} WHERE {where}" + page.replace("ts_col", "e.ts").replace("id_col", "e.id")
        + " ORDER BY e.ts DESC, e.id DESC LIMIT ?", [*params, *page_params, limit + 1]))
    return _event_rows(rows, limit)


def user_timeline(conn: apsw.Connection, project_id: int, distinct_id: str, window: Window, limit: int,
                  cursor: tuple[int, int] | None) -> dict | None:
    """One user (by any of their distinct ids) and their events in the window, newest first."""
    person = conn.execute(
        "SELECT p.id, p.distinct_id, p.traits, p.first_seen, p.last_seen, p.event_count FROM person_ids i"
        " JOIN persons p ON p.id = i.person_id WHERE i.project_id = ? AND i.distinct_id = ?",
        (project_id, distinct_id),
    ).fetchone()
    if person is None:
        return None
    person_id, shown, traits, first, last, count = person
    page, page_params = _cursor(cursor)
    end = window.end if cursor is None else min(window.end, cursor[0] + 1)
    rows: list[tuple] = []
    for start, stop in _person_ranges(conn, project_id, person_id, Window(max(window.start, first), min(end, last + 1))):
        rows += conn.execute(
            f"{_EVENT_COLUMNS} WHERE e.project_id = ? AND e.ts >= ? AND e.ts < ? AND e.person_id = ?"
            + page.replace("ts_col", "e.ts").replace("id_col", "e.id") + " ORDER BY e.ts DESC, e.id DESC LIMIT ?",
            [project_id, start, stop, person_id, *page_params, limit + 1 - len(rows)])
        if len(rows) > limit:
            break
    return {"user": {"distinct_id": shown, "traits": _json(traits), "first_seen": first, "last_seen": last,
                     "events": count}, **_event_rows(rows, limit)}


def _person_ranges(conn: apsw.Connection, project_id: int, person_id: int, window: Window
                   ) -> Iterator[tuple[int, int]]:
    """The parts of the window that can hold the person's events, newest first: the whole hours whose
    rollup (of every event, bots too) has the person in its set of users, and the minutes at the edges."""
    hours, raw = window.split()
    if hours is None:
        yield from reversed(raw)
        return
    if raw and raw[-1][0] >= hours[1] * HOUR_MS:
        yield raw.pop()
    present = sorted({hour for hour, user_set in conn.execute(
        "SELECT hour, user_set FROM hourly WHERE project_id = ? AND name_id = 0 AND hour >= ? AND hour < ?",
        (project_id, *hours)) if person_id in BitMap.deserialize(user_set)}, reverse=True)
    while present:  # runs of consecutive hours as one range
        top = bottom = present.pop(0)
        while present and present[0] == bottom - 1:
            bottom = present.pop(0)
        yield bottom * HOUR_MS, (top + 1) * HOUR_MS
    yield from raw


_PROPERTY_KEYS = ("SELECT j.key, e.person_id {raw}, json_each(e.props) j WHERE {where} AND e.props IS NOT NULL")
_PROPERTY_VALUES = ("SELECT CAST(json_extract(e.props, ?) AS TEXT) AS v, e.person_id {raw}"
                    " WHERE {where} AND e.props IS NOT NULL AND v IS NOT NULL")


def _property_rows(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, sql: str,
                   extra: list, kind: tuple, limit: int) -> list[dict]:
    """Events and users per value of `sql` (a key or a key's value). Whole hours come from the day cache:
    unfiltered and under trait filters, from per-person counts of every event; under other filters, from
    that filter's own scans."""
    def scan(start: int, end: int, filters: Filters) -> dict[str, list[int]]:
        source, where, params = _scan(conn, project_id, start, end, filters)
        people: dict[str, list[int]] = defaultdict(list)
        for value, person_id in conn.execute(sql.format(raw=source, where=where), [*extra, *params]):
            people[value].append(person_id)
        return people

    def counted(start: int, end: int) -> dict[str, Totals]:
        return {value: Totals(len(ids), BitMap(ids)) for value, ids in scan(start, end, filters).items()}

    if filters != Filters() and not filters.traits_only:
        return _ranked(_by_value(conn, project_id, window, filters, kind, counted), limit)
    people = _trait_people(conn, project_id, filters.traits) if filters.traits else None
    hours, raw = window.split()
    found: dict[str, Totals] = defaultdict(Totals)
    if hours is not None:
        for part in _spans(conn, project_id, hours, 0, ("tallies", *kind), lambda span: {
                value: Tally.of(ids) for value, ids in scan(span[0] * HOUR_MS, span[1] * HOUR_MS, Filters()).items()}):
            for value, tally in part.items():
                total = tally.totals(people)
                if total.events:
                    found[value].add(total)
    return _ranked(_merge((counted(start, end) for start, end in raw), found), limit)


def property_keys(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, limit: int) -> list[dict]:
    return _property_rows(conn, project_id, window, filters, _PROPERTY_KEYS, [], ("property keys",), limit)


def property_values(conn: apsw.Connection, project_id: int, window: Window, filters: Filters, key: str,
                    limit: int) -> list[dict]:
    return _property_rows(conn, project_id, window, filters, _PROPERTY_VALUES, [_json_path(key)],
                          ("property values", key), limit)


_ACTIVE_PERSONS = "p.project_id = ? AND p.last_seen >= ? AND p.first_seen < ?"


def trait_keys(conn: apsw.Connection, project_id: int, window: Window, limit: int) -> list[dict]:
    """Trait keys of the persons seen in the window, by how many of them have it."""
    rows = conn.execute(
        f"SELECT j.key, count(*) FROM persons p, json_each(p.traits) j WHERE {_ACTIVE_PERSONS} AND p.traits IS NOT NULL"
        " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?", [project_id, window.start, window.end, limit])
    return [{"value": key, "count": count, "unique_users": count} for key, count in rows]


def trait_values(conn: apsw.Connection, project_id: int, window: Window, key: str, limit: int) -> list[dict]:
    """Values of one trait over the persons seen in the window, by how many of them have it."""
    rows = conn.execute(
        f"SELECT CAST(json_extract(p.traits, ?) AS TEXT) AS v, count(*) FROM persons p WHERE {_ACTIVE_PERSONS}"
        " AND v IS NOT NULL"
        " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?", [_json_path(key), project_id, window.start, window.end, limit])
    return [{"value": value, "count": count, "unique_users": count} for value, count in rows]


def _json(text: str | None):
    return None if text is None else json.loads(text)


def _uuid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=raw)
