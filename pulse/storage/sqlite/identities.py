"""Persons and sessions: whose event it is and which visit, with ids the writer hands out itself.

Runs in the writer process only. The writer is the only connection that inserts persons and sessions,
so a new one gets its id at once and is inserted once per commit; the caches (per project: distinct id
-> person id, session key -> session id) mirror committed rows and are filled by one batched lookup per
commit. What events add to existing rows (counts, times, entry and exit pages) is written behind them,
from the changes kept in write_behind.Kept.

An event without a session id (a Plausible or Umami snippet's, a backend's, a plain API call's) gets one
from its person: it joins the person's current inferred session when its time lies within SESSION_GAP_MS
after that session's last event and not more than SESSION_GAP_MS before its first, and starts a new one
(key INFERRED and random hex) otherwise. A person's current inferred session is the one with the latest
last event (the highest id among equals): only it is ever joined, and a new session becomes current
unless it starts before the current one's last event (an event that arrived out of order by more than the
gap). So the current session follows from the sessions' times alone, and is found again from the table and
the changes kept in memory after a cache is emptied or the writer restarts (`load`, `rebuild_current`).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable

import apsw

from pulse.storage.model import DAY_MS
from pulse.storage.sqlite.interning import json_chunks
from pulse.storage.sqlite.write_behind import ENTRY_TS, EVENTS, FIRST, LAST, SESSION_FIELDS, Kept

# ids kept per generation of each cache (persons by distinct id, sessions by key, current inferred sessions;
# ~150 bytes an entry): a busy site's visitors and open sessions fit, so the batched lookups find few to load
CACHE_LIMIT = 250_000
# the longest pause between two events of one inferred session
SESSION_GAP_MS = 30 * 60_000
# what the key of every inferred session starts with; a client's session id that does is taken for none
INFERRED = "$auto:"
_random_bits = random.Random(os.urandom(32)).getrandbits  # uniqueness, not secrecy: no syscall per session

_LOOKUP_PEOPLE = (
    "SELECT distinct_id, person_id FROM person_ids"
    " WHERE project_id = ? AND distinct_id IN (SELECT value FROM json_each(?))"
)
_LOOKUP_SESSIONS = (
    "SELECT session_key, id, first_ts FROM sessions"
    " WHERE project_id = ? AND session_key IN (SELECT value FROM json_each(?))"
)
_SESSION_FIRST = "SELECT id, project_id, first_ts FROM sessions WHERE id IN (SELECT value FROM json_each(?))"
# the GLOB term is the one of the partial index sessions_inferred (schema migration 7); named, as SQLite
# would otherwise read every inferred session of the project through the range GLOB makes of the unique key
_INFERRED_WHERE = "session_key GLOB '$auto:*'"
_LOOKUP_INFERRED = (
    "SELECT person_id, id, first_ts, last_ts FROM sessions INDEXED BY sessions_inferred"
    f" WHERE project_id = ? AND person_id IN (SELECT value FROM json_each(?)) AND {_INFERRED_WHERE}"
)
_INFERRED_BY_ID = (
    "SELECT id, project_id, person_id, first_ts, last_ts FROM sessions"
    f" WHERE id IN (SELECT value FROM json_each(?)) AND {_INFERRED_WHERE}"
)
_TOUCH_SESSION_DAY = (
    "INSERT INTO session_days(project_id, day, generation) VALUES (?, ?, ?)"
    " ON CONFLICT(project_id, day) DO UPDATE SET generation = excluded.generation"
)
_INSERT_PERSON = (
    "INSERT INTO persons(id, project_id, distinct_id, first_seen, last_seen, event_count, derived_through)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_PERSON_ID = "INSERT INTO person_ids(project_id, distinct_id, person_id) VALUES (?, ?, ?)"
_RENAME_PERSON = "UPDATE persons SET distinct_id = ? WHERE id = ?"
_UPDATE_PERSON = (
    "UPDATE persons SET first_seen = min(first_seen, ?), last_seen = max(last_seen, ?),"
    " event_count = event_count + ?, derived_through = ? WHERE id = ?"
)
_MERGE_TRAITS = "UPDATE persons SET traits = json_patch(coalesce(traits, '{}'), ?) WHERE id = ?"
_TOUCH_TRAITS = "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
_INSERT_SESSION = (
    "INSERT INTO sessions(id, project_id, session_key, person_id, first_ts, last_ts, events, pageviews,"
    " entry_ts, entry_path_id, referrer_id, utm_source_id, utm_medium_id, utm_campaign_id, exit_ts, exit_path_id,"
    " agent_id, derived_through) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLite evaluates every SET expression against the row as it was, so the CASEs all see the old entry_ts.
# first_ts is only named when it moves: SQLite rewrites the entry of sessions_project_first for every
# UPDATE that assigns the column, even to its own value (a page of WAL per session per commit).
# Both take a kept session change by position, then the mark of the row (write_behind: the last event whose
# changes to it are written), then the session's id: SQLite numbers named parameters in order of first
# appearance, which is the order of SESSION_FIELDS (checked below).
_EARLIER_ENTRY = ":entry_ts IS NOT NULL AND (entry_ts IS NULL OR :entry_ts < entry_ts)"
_LATER_EXIT = ":exit_ts IS NOT NULL AND (exit_ts IS NULL OR :exit_ts >= exit_ts)"
_SESSION_CHANGES = f"""
    last_ts = max(last_ts, :last_ts),
    events = events + :events,
    pageviews = pageviews + :pageviews,
    entry_path_id = CASE WHEN {_EARLIER_ENTRY} THEN :entry_path_id ELSE entry_path_id END,
    referrer_id = CASE WHEN {_EARLIER_ENTRY} THEN :referrer_id ELSE referrer_id END,
    utm_source_id = CASE WHEN {_EARLIER_ENTRY} THEN :utm_source_id ELSE utm_source_id END,
    utm_medium_id = CASE WHEN {_EARLIER_ENTRY} THEN :utm_medium_id ELSE utm_medium_id END,
    utm_campaign_id = CASE WHEN {_EARLIER_ENTRY} THEN :utm_campaign_id ELSE utm_campaign_id END,
    entry_ts = CASE WHEN {_EARLIER_ENTRY} THEN :entry_ts ELSE entry_ts END,
    exit_path_id = CASE WHEN {_LATER_EXIT} THEN :exit_path_id ELSE exit_path_id END,
    exit_ts = CASE WHEN {_LATER_EXIT} THEN :exit_ts ELSE exit_ts END,
    agent_id = coalesce(agent_id, :agent_id),
    derived_through = :mark
WHERE id = :id
"""
_UPDATE_SESSION = "UPDATE sessions SET first_ts = min(first_ts, :first_ts)," + _SESSION_CHANGES  # the whole change
_UPDATE_LATER_SESSION = "UPDATE sessions SET" + _SESSION_CHANGES  # the change from LAST on
assert list(dict.fromkeys(re.findall(r":(\w+)", _UPDATE_SESSION))) == [*SESSION_FIELDS, "mark", "id"]
# the common case: the batch has no page view of the session, so only its times and event count change
_EXTEND_SESSION = (
    "UPDATE sessions SET first_ts = min(first_ts, ?), last_ts = max(last_ts, ?), events = events + ?,"
    " derived_through = ? WHERE id = ?"
)
_EXTEND_LATER_SESSION = (
    "UPDATE sessions SET last_ts = max(last_ts, ?), events = events + ?, derived_through = ? WHERE id = ?"
)


def _promote(keys: set[str], old: dict[str, int] | None, cache: dict[str, int]) -> list[str]:
    """Move the keys the old generation holds into the young one; returns the others (to look up)."""
    if not old:
        return list(keys)
    missing = []
    for key in keys:
        found = old.get(key)
        if found is None:
            missing.append(key)
        else:
            cache[key] = found
    return missing


def _max_id(conn: apsw.Connection, table: str) -> int:
    return conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0


class Identities:
    """The person and session ids of a project's distinct ids and session keys, and the rows of both."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        # per project: distinct id -> person id, session key -> session id; each with the generation before
        # (see trim): every id a batch names is brought into the young one before the batch is resolved
        self.persons: dict[int, dict[str, int]] = {}
        self.sessions: dict[int, dict[str, int]] = {}
        self.old_persons: dict[int, dict[str, int]] = {}
        self.old_sessions: dict[int, dict[str, int]] = {}
        # session id -> (project, first_ts), for every session in self.sessions (and the generation before)
        self.session_first: dict[int, tuple[int, int]] = {}
        self.old_first: dict[int, tuple[int, int]] = {}
        # person id -> [session id, first ts, last ts] of the person's current inferred session, with the
        # changes kept in memory: a person missing has none, or none changed since the cache was emptied
        self.current: dict[int, list[int]] = {}
        self.next_person_id = _max_id(conn, "persons") + 1
        self.next_session_id = _max_id(conn, "sessions") + 1
        self.begin()

    def trim(self) -> None:
        """Start a new generation of the person or session cache once it holds more than CACHE_LIMIT ids.

        The full one becomes the old generation and the one before it is dropped, so the cache never holds
        more than twice CACHE_LIMIT, and an id named since the last change of generation is still found
        without a query: the ids a busy site's traffic names again and again stay, whatever came between."""
        if sum(len(c) for c in self.persons.values()) > CACHE_LIMIT:
            self.old_persons, self.persons = self.persons, {}
        if sum(len(c) for c in self.sessions.values()) > CACHE_LIMIT:
            self.old_sessions, self.sessions = self.sessions, {}
            self.old_first, self.session_first = self.session_first, {}
        elif len(self.session_first) > CACHE_LIMIT:  # inferred sessions' first times: no key names them
            self.old_first, self.session_first = self.session_first, {}

    def trim_current(self, keep: Callable[[], set[int]]) -> None:
        """Past CACHE_LIMIT persons, drop the current inferred session of each whose session has no change kept
        (not in the set `keep` gives).

        The table holds such a session's true times, and no other session of the person can be later there
        than it truly is, so a person looked up there afterwards finds what the cache held."""
        if len(self.current) > CACHE_LIMIT:
            kept = keep()
            self.current = {person_id: held for person_id, held in self.current.items() if held[0] in kept}

    def begin(self) -> None:
        """Start a batch: no person, link or session is new yet."""
        self.new_persons: dict[int, list] = {}  # id -> [project, distinct_id, first ts]
        self.new_links: list[tuple[int, str, int]] = []
        self.renames: list[tuple[str, int]] = []
        self.new_sessions: dict[int, tuple[int, str, int]] = {}  # id -> (project, key, person)

    # -- finding and handing out ids -------------------------------------------------------------

    def load(self, people: dict[int, set[str]], session_keys: dict[int, set[str]],
             keyless: dict[int, set[str]]) -> None:
        """Bring every wanted distinct id and session key of each project that exists into the caches, one
        query per 5000 keys; sessions keep their first time too. `keyless`: the distinct ids (and anonymous
        ids) of events without a session id, whose persons' current inferred sessions are looked up."""
        for project_id, keys in people.items():
            cache = self.persons.setdefault(project_id, {})
            for chunk in json_chunks(_promote(keys, self.old_persons.get(project_id), cache)):
                cache.update(self.conn.execute(_LOOKUP_PEOPLE, (project_id, chunk)))
        for project_id, keys in session_keys.items():
            cache = self.sessions.setdefault(project_id, {})
            old = self.old_sessions.get(project_id)
            if old:
                first_seen, old_first = self.session_first, self.old_first
                for key in keys:
                    session_id = old.get(key)
                    if session_id is not None and session_id in old_first:
                        cache[key] = session_id
                        first_seen[session_id] = old_first[session_id]
                keys = [key for key in keys if key not in cache]
            for chunk in json_chunks(list(keys)):
                for key, session_id, first_ts in self.conn.execute(_LOOKUP_SESSIONS, (project_id, chunk)):
                    cache[key] = session_id
                    self.session_first[session_id] = (project_id, first_ts)
        for project_id, names in keyless.items():
            persons, current = self.persons[project_id], self.current
            wanted = {persons[name] for name in names if name in persons}
            self._load_current(project_id, [person_id for person_id in wanted if person_id not in current])

    def _load_current(self, project_id: int, person_ids: list[int]) -> None:
        """The current inferred session of each of the persons, as the table holds it."""
        current = self.current
        for chunk in json_chunks(person_ids):
            for person_id, session_id, first_ts, last_ts in self.conn.execute(_LOOKUP_INFERRED, (project_id, chunk)):
                found = current.get(person_id)
                if found is None or (last_ts, session_id) > (found[2], found[0]):
                    current[person_id] = [session_id, first_ts, last_ts]

    def rebuild_current(self, changed: set[int], kept: Kept) -> None:
        """The current inferred session of every person with a session among `changed` (those with
        changes kept in memory, rebuilt from the events after a restart), with those changes.

        The current session is the one with the latest last event. One whose changes are all in the
        table has its true times there, later than any other's there, so it is the table's latest;
        else it is among the changed, whose true times are the table's and the kept changes' together."""
        found: list[tuple[int, int, int, int, int]] = []
        for chunk in json_chunks(list(changed)):
            found.extend(self.conn.execute(_INFERRED_BY_ID, (chunk,)))
        by_project: dict[int, set[int]] = {}
        for _, project_id, person_id, _, _ in found:
            by_project.setdefault(project_id, set()).add(person_id)
        for project_id, person_ids in by_project.items():
            self._load_current(project_id, list(person_ids))
        current = self.current
        for session_id, _, person_id, first_ts, last_ts in found:
            delta = kept.sessions[session_id]
            first_ts, last_ts = min(first_ts, delta[FIRST]), max(last_ts, delta[LAST])
            held = current.get(person_id)
            if held is None or held[0] == session_id or (last_ts, session_id) > (held[2], held[0]):
                current[person_id] = [session_id, first_ts, last_ts]

    def new_person(self, project_id: int, distinct_id: str, ts: int) -> int:
        person_id = self.next_person_id
        self.next_person_id += 1
        self.persons[project_id][distinct_id] = person_id
        self.new_persons[person_id] = [project_id, distinct_id, ts]
        self.new_links.append((project_id, distinct_id, person_id))
        return person_id

    def _link(self, project_id: int, distinct_id: str, person_id: int) -> None:
        self.persons[project_id][distinct_id] = person_id
        self.new_links.append((project_id, distinct_id, person_id))

    def identify(self, project_id: int, distinct_id: str, anon_id: str, ts: int) -> int:
        """Link an anonymous id to a known id: both resolve to one person from now on."""
        persons = self.persons[project_id]
        known = persons.get(distinct_id)
        anon = persons.get(anon_id)
        if known is None and anon is not None:
            self._link(project_id, distinct_id, anon)
            if anon in self.new_persons:
                self.new_persons[anon][1] = distinct_id
            else:
                self.renames.append((distinct_id, anon))
            return anon
        if known is None:
            known = self.new_person(project_id, distinct_id, ts)
        if anon is None and anon_id != distinct_id:
            self._link(project_id, anon_id, known)
        return known

    def new_session(self, project_id: int, session_key: str, person_id: int) -> int:
        session_id = self.next_session_id
        self.next_session_id += 1
        self.sessions[project_id][session_key] = session_id
        self.new_sessions[session_id] = (project_id, session_key, person_id)
        return session_id

    def inferred_session(self, project_id: int, person_id: int, ts: int) -> int:
        """The session of an event without a session id: its person's current inferred session, or a new
        one (see the module's docstring)."""
        held = self.current.get(person_id)
        if held is not None:
            session_id, first, last = held
            if first - SESSION_GAP_MS <= ts <= last + SESSION_GAP_MS:
                if ts < first:
                    held[1] = ts
                elif ts > last:
                    held[2] = ts
                return session_id
        session_id = self.next_session_id
        self.next_session_id += 1
        self.new_sessions[session_id] = (project_id, f"{INFERRED}{_random_bits(64):016x}", person_id)
        if held is None or ts >= held[2]:
            self.current[person_id] = [session_id, ts, ts]
        return session_id

    # -- the rows --------------------------------------------------------------------------------

    def write_people(self, kept: Kept, traits: list[tuple[str, int]], traited: set[int], flush: bool, mark: int,
                     generation: int) -> None:
        """Insert new persons and links, and merge traits. If `flush`, a new person gets the changes kept of
        it, written through the last event (`mark`); otherwise it is inserted with no events (its times are
        safe to apply twice) and its changes stay kept."""
        conn = self.conn
        pending = kept.persons
        fresh = []
        for person_id, (project_id, distinct_id, ts) in self.new_persons.items():
            first, last, count = (pending.pop(person_id, None) if flush else pending.get(person_id)) or (ts, ts, 0)
            fresh.append((person_id, project_id, distinct_id, first, last, count if flush else 0, mark if flush else 0))
        conn.executemany(_INSERT_PERSON, fresh)
        conn.executemany(_INSERT_PERSON_ID, self.new_links)
        if self.renames:
            conn.executemany(_RENAME_PERSON, self.renames)
        if traits:
            conn.executemany(_MERGE_TRAITS, traits)
            # readers keep who has which trait while this is unchanged
            conn.executemany(_TOUCH_TRAITS, [(f"traits:{project_id}", generation) for project_id in traited])

    def write_sessions(self, kept: Kept, flush: bool, mark: int) -> set[tuple[int, int]]:
        """Insert new sessions (with their kept changes, written through `mark`, if `flush`; see write_people);
        returns their start days, to be marked as changed (touch_days)."""
        pending = kept.sessions
        first_seen = self.session_first
        days: set[tuple[int, int]] = set()
        fresh = []
        for session_id, (project_id, key, person_id) in self.new_sessions.items():
            delta = pending.pop(session_id, None) if flush else pending.get(session_id)
            if delta is None:  # only duplicate events named it
                continue
            (first, last, events, pageviews, entry_ts, entry_path, referrer, source, medium, campaign,
             exit_ts, exit_path, agent_id) = delta
            if not flush:
                events = pageviews = 0
            fresh.append((session_id, project_id, key, person_id, first, last, events, pageviews, entry_ts,
                          entry_path, referrer, source, medium, campaign, exit_ts, exit_path, agent_id,
                          mark if flush else 0))
            first_seen[session_id] = (project_id, first)
            days.add((project_id, first // DAY_MS))
        self.conn.executemany(_INSERT_SESSION, fresh)
        return days

    def touch_days(self, days: set[tuple[int, int]], generation: int) -> None:
        """Mark the start days of the sessions written as changed (generation: above every earlier commit's)."""
        self.conn.executemany(_TOUCH_SESSION_DAY, [(*day, generation) for day in days])

    def update_persons(self, changes: dict[int, list[int]], mark: int) -> None:
        """Write kept person changes, each row's through the event `mark`."""
        # in the order of the table: neighbours share pages, each read and written once
        self.conn.executemany(_UPDATE_PERSON, [(p[0], p[1], p[2], mark, person_id)
                                               for person_id, p in sorted(changes.items())])

    def update_sessions(self, changes: dict[int, list], mark: int, days: set[tuple[int, int]]) -> None:
        """Write kept session changes, each row's through the event `mark`; adds the start days of the sessions
        changed to `days`."""
        first_seen, old_first = self.session_first, self.old_first
        missing = []
        for session_id in changes:
            if session_id not in first_seen:
                found = old_first.get(session_id)
                if found is None:
                    missing.append(session_id)
                else:
                    first_seen[session_id] = found
        for chunk in json_chunks(missing):
            for session_id, project_id, first_ts in self.conn.execute(_SESSION_FIRST, (chunk,)):
                first_seen[session_id] = (project_id, first_ts)
        extend, extend_later, full, full_later = [], [], [], []
        for session_id, delta in sorted(changes.items()):  # in the order of the table (as persons)
            if session_id not in first_seen:  # deleted with its project since
                continue
            project_id, first = first_seen[session_id]
            days.add((project_id, first // DAY_MS))
            earlier = delta[FIRST] < first
            if earlier:  # an earlier event: the session now starts then
                first_seen[session_id] = (project_id, delta[FIRST])
                days.add((project_id, delta[FIRST] // DAY_MS))
            if delta[ENTRY_TS] is not None:
                if earlier:
                    full.append((*delta, mark, session_id))
                else:
                    full_later.append((*delta[LAST:], mark, session_id))
            elif earlier:  # no page view: entry, exit and page views stay as they are
                extend.append((delta[FIRST], delta[LAST], delta[EVENTS], mark, session_id))
            else:
                extend_later.append((delta[LAST], delta[EVENTS], mark, session_id))
        self.conn.executemany(_EXTEND_SESSION, extend)
        self.conn.executemany(_EXTEND_LATER_SESSION, extend_later)
        self.conn.executemany(_UPDATE_SESSION, full)
        self.conn.executemany(_UPDATE_LATER_SESSION, full_later)
