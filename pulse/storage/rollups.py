"""How one group commit becomes rows: events, interned strings, persons, sessions and hourly rollups.

Runs in the writer process only. The caches here mirror committed rows; any failed transaction clears them.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import apsw
import msgspec
from pyroaring import BitMap

from pulse.enrich import parse_agent, split_url
from pulse.storage.sqlite.projects import catalog_version
from pulse.storage.rows import (
    ANON_ID, DAY_MS, DISTINCT_ID, HOUR_MS, NAME, PAGE_VIEW, PATH, PROPS, REFERRER, REFERRER_DOMAIN, SESSION_KEY,
    TRAITS, TS, UID, URL, UTM_CAMPAIGN, UTM_MEDIUM, UTM_SOURCE, time_uuid,
)

# ids of persons and sessions kept per cache (~120 bytes an entry; a site's open sessions fit many times
# over); past it a cache is emptied and refilled by the batched lookups of the next commits
_CACHE_LIMIT = 50_000
_ROLLUP_CACHE_LIMIT = 20_000
COMPACT_EVERY_S = 2.0
# the `accepted` of a job's result when its project was deleted before the job's commit: nothing of it
# is written, and the request is answered like one with a revoked key
PROJECT_GONE = -1

_encode = msgspec.json.Encoder().encode


class Submit(msgspec.Struct, array_like=True, tag="submit"):
    """One request's prepared events, as the server process sends them to the writer."""

    job_id: int
    project_id: int
    received: int
    ip: str
    user_agent: str
    events: list[tuple]


@dataclass(slots=True)
class Rollup:
    """The whole of one (project, hour, event, bot) key, and how many rows hold it."""

    events: int = 0
    users: BitMap = field(default_factory=BitMap)
    sessions: BitMap = field(default_factory=BitMap)
    rows: int = 0


DIM_AGENT = 1  # browser, OS and device follow from the user agent
DIM_PAGE = 2  # page views by path


class RollupStore:
    """One rollup table. Each commit adds a row per touched key holding only what is new to the key (its
    events, and the ids not yet in its sets), so a key's rows are disjoint and add up; `compact` merges
    a key's rows into one. The cache holds the whole of every key touched lately."""

    def __init__(self, conn: apsw.Connection, table: str, key: tuple[str, ...], sessions: bool) -> None:
        self.conn = conn
        self.sessions = sessions
        columns = [*key, "seq", "events", "users", "user_set"] + (["sessions", "session_set"] if sessions else [])
        match = " AND ".join(f"{column} = ?" for column in key)
        self.insert_sql = f"INSERT INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        self.load_sql = (f"SELECT events, user_set{', session_set' if sessions else ''} FROM {table}"
                         f" WHERE {match}")
        self.delete_sql = f"DELETE FROM {table} WHERE {match}"
        self.clear()

    def clear(self) -> None:
        self.cache: dict[tuple, Rollup] = {}
        self.uncompacted: set[tuple] = set()

    def get(self, key: tuple) -> Rollup:
        found = self.cache.get(key)
        if found is not None:
            return found
        found = Rollup()
        for row in self.conn.execute(self.load_sql, key):
            found.events += row[0]
            found.users |= BitMap.deserialize(row[1])
            if self.sessions:
                found.sessions |= BitMap.deserialize(row[2])
            found.rows += 1
        if found.rows > 1:
            self.uncompacted.add(key)
        self.cache[key] = found
        return found

    def add(self, deltas: dict[tuple, list], seq: int) -> None:
        """deltas: key -> [events, BitMap of users, BitMap of sessions]; writes one row per key."""
        rows = []
        for key, (count, users, sessions) in deltas.items():
            rollup = self.get(key)
            users -= rollup.users
            rollup.events += count
            rollup.users |= users
            rollup.rows += 1
            if rollup.rows > 1:
                self.uncompacted.add(key)
            row = (*key, seq, count, len(users), users.serialize())
            if self.sessions:
                sessions -= rollup.sessions
                rollup.sessions |= sessions
                row += (len(sessions), sessions.serialize())
            rows.append(row)
        self.conn.executemany(self.insert_sql, rows)

    def compact(self) -> int:
        """Rewrite every key kept in several rows as one row; returns how many keys were compacted."""
        keys, self.uncompacted = self.uncompacted, set()
        rows = []
        for key in keys:
            rollup = self.get(key)
            row = (*key, 0, rollup.events, len(rollup.users), rollup.users.serialize())
            if self.sessions:
                row += (len(rollup.sessions), rollup.sessions.serialize())
            rows.append(row)
            rollup.rows = 1
        self.conn.executemany(self.delete_sql, list(keys))
        self.conn.executemany(self.insert_sql, rows)
        return len(keys)


# A session's changes within one batch, as a list (one per session per batch, so kept cheap):
# [first_ts, last_ts, events, pageviews, entry_ts, entry_path, entry_referrer, entry_source, entry_medium,
#  entry_campaign, exit_ts, exit_path, agent_id] -- the order of _UPDATE_SESSION's parameters
FIRST, LAST, EVENTS, PAGEVIEWS, ENTRY_TS, ENTRY_PATH, ENTRY_REF, ENTRY_SRC, ENTRY_MED, ENTRY_CAMP, EXIT_TS, EXIT_PATH = range(12)


_INSERT_EVENT = (
    "INSERT INTO events(id, project_id, uuid, ts, received, name_id, person_id, session_id, url_id, path_id,"
    " referrer_id, referrer_domain_id, agent_id, ip_hash, props)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(project_id, uuid) DO NOTHING"  # never skips: repeats were found first; checked after
)
_LOOKUP_PEOPLE = (
    "SELECT distinct_id, person_id FROM person_ids"
    " WHERE project_id = ? AND distinct_id IN (SELECT value FROM json_each(?))"
)
_STORED_UUIDS = (
    "SELECT uuid FROM events WHERE project_id = ? AND uuid IN (SELECT unhex(value) FROM json_each(?))"
)
_LOOKUP_SESSIONS = (
    "SELECT session_key, id, first_ts FROM sessions"
    " WHERE project_id = ? AND session_key IN (SELECT value FROM json_each(?))"
)
_TOUCH_SESSION_DAY = (
    "INSERT INTO session_days(project_id, day, generation) VALUES (?, ?, ?)"
    " ON CONFLICT(project_id, day) DO UPDATE SET generation = excluded.generation"
)
_UNWRITTEN = (
    "SELECT e.project_id, e.ts, e.name_id, e.person_id, e.session_id, e.path_id, e.referrer_domain_id, e.agent_id,"
    " coalesce(a.is_bot, 0), u.value FROM events e LEFT JOIN agents a ON a.id = e.agent_id"
    " LEFT JOIN strings u ON u.id = e.url_id"
    " WHERE e.id > ? ORDER BY e.id"
)
_EXISTING_PROJECTS = "SELECT id FROM projects WHERE id IN (SELECT value FROM json_each(?))"
_SESSION_FIRST = "SELECT id, project_id, first_ts FROM sessions WHERE id IN (SELECT value FROM json_each(?))"
_WRITTEN_THROUGH = "UPDATE meta SET value = ? WHERE key = 'derived_through'"
_INSERT_PERSON = (
    "INSERT INTO persons(id, project_id, distinct_id, first_seen, last_seen, event_count) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_PERSON_ID = "INSERT INTO person_ids(project_id, distinct_id, person_id) VALUES (?, ?, ?)"
_RENAME_PERSON = "UPDATE persons SET distinct_id = ? WHERE id = ?"
_UPDATE_PERSON = (
    "UPDATE persons SET first_seen = min(first_seen, ?), last_seen = max(last_seen, ?),"
    " event_count = event_count + ? WHERE id = ?"
)
_MERGE_TRAITS = "UPDATE persons SET traits = json_patch(coalesce(traits, '{}'), ?) WHERE id = ?"
_TOUCH_TRAITS = "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
_INSERT_SESSION = (
    "INSERT INTO sessions(id, project_id, session_key, person_id, first_ts, last_ts, events, pageviews,"
    " entry_ts, entry_path_id, referrer_id, utm_source_id, utm_medium_id, utm_campaign_id, exit_ts, exit_path_id,"
    " agent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLite evaluates every SET expression against the row as it was, so the CASEs all see the old entry_ts.
# first_ts is only named when it moves: SQLite rewrites the entry of sessions_project_first for every
# UPDATE that assigns the column, even to its own value (a page of WAL per session per commit)
_SESSION_CHANGES = """
    last_ts = max(last_ts, ?2),
    events = events + ?3,
    pageviews = pageviews + ?4,
    entry_path_id = CASE WHEN ?5 IS NOT NULL AND (entry_ts IS NULL OR ?5 < entry_ts) THEN ?6 ELSE entry_path_id END,
    referrer_id = CASE WHEN ?5 IS NOT NULL AND (entry_ts IS NULL OR ?5 < entry_ts) THEN ?7 ELSE referrer_id END,
    utm_source_id = CASE WHEN ?5 IS NOT NULL AND (entry_ts IS NULL OR ?5 < entry_ts) THEN ?8 ELSE utm_source_id END,
    utm_medium_id = CASE WHEN ?5 IS NOT NULL AND (entry_ts IS NULL OR ?5 < entry_ts) THEN ?9 ELSE utm_medium_id END,
    utm_campaign_id = CASE WHEN ?5 IS NOT NULL AND (entry_ts IS NULL OR ?5 < entry_ts)
        THEN ?10 ELSE utm_campaign_id END,
    entry_ts = CASE WHEN ?5 IS NOT NULL AND (entry_ts IS NULL OR ?5 < entry_ts) THEN ?5 ELSE entry_ts END,
    exit_path_id = CASE WHEN ?11 IS NOT NULL AND (exit_ts IS NULL OR ?11 >= exit_ts) THEN ?12 ELSE exit_path_id END,
    exit_ts = CASE WHEN ?11 IS NOT NULL AND (exit_ts IS NULL OR ?11 >= exit_ts) THEN ?11 ELSE exit_ts END,
    agent_id = coalesce(agent_id, ?13)
WHERE id = ?14
"""
_UPDATE_SESSION = "UPDATE sessions SET first_ts = min(first_ts, ?1)," + _SESSION_CHANGES
_UPDATE_LATER_SESSION = "UPDATE sessions SET" + _SESSION_CHANGES  # ?1 is bound and unused
# the common case: the batch has no page view of the session, so only its times and event count change
_EXTEND_SESSION = "UPDATE sessions SET first_ts = min(first_ts, ?), last_ts = max(last_ts, ?), events = events + ? WHERE id = ?"
_EXTEND_LATER_SESSION = "UPDATE sessions SET last_ts = max(last_ts, ?), events = events + ? WHERE id = ?"


def _json_chunks(values: list) -> Iterator[str]:
    """The values as JSON arrays of at most 5000, one per `IN (SELECT value FROM json_each(?))` lookup."""
    for start in range(0, len(values), 5000):
        yield _encode(values[start:start + 5000]).decode()


def _max_id(conn: apsw.Connection, table: str) -> int:
    return conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0


class BatchApplier:
    """Applies batches of ingest jobs inside the writer's transaction, keeping caches of interned ids.

    The writer is the only connection that inserts events, persons and sessions, so it hands out
    their ids itself, and new rows are inserted once with their final values. Events whose uuid the
    project already has are found before any row is built (only client-made uuids can repeat).
    """

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        self.catalog = -1
        self.reset()

    def reset(self) -> None:
        """Forget every cache; they are rebuilt from committed rows on demand."""
        self.strings: dict[str, int] = {}
        self.agents: dict[str, tuple[int, bool]] = {}
        # per project: distinct id -> person id, session key -> session id
        self.persons: dict[int, dict[str, int]] = {}
        self.sessions: dict[int, dict[str, int]] = {}
        # session id -> (project, first_ts), for every session in self.sessions
        self.session_first: dict[int, tuple[int, int]] = {}
        self.hourly = RollupStore(self.conn, "hourly", ("project_id", "hour", "name_id", "bot"), sessions=True)
        self.dims = RollupStore(self.conn, "hourly_dims", ("project_id", "dim", "hour", "value_id", "bot"),
                                sessions=False)
        self.salts: dict[int, bytes] = {}
        self.compacted_at = time.monotonic()
        self.next_event_id = _max_id(self.conn, "events") + 1
        self.next_person_id = _max_id(self.conn, "persons") + 1
        self.next_session_id = _max_id(self.conn, "sessions") + 1
        self._replay()

    # -- rollup, session and person changes written behind the events ---------------------------

    @property
    def unwritten(self) -> int:
        """How many stored events have rollup, session and person changes kept in memory, not yet written."""
        return self.next_event_id - 1 - self.derived_through

    def unwritten_for(self, now: float) -> float:
        """Seconds since the oldest change kept in memory was made (0 when there is none)."""
        return 0.0 if self.pending_since is None else now - self.pending_since

    def _replay(self) -> None:
        """Rebuild the changes kept in memory from the events stored after derived_through.

        They were lost with a crashed writer or a rolled-back transaction; the events that make them are
        on disk, and every session and person row holds nothing of them but idempotent times.
        """
        conn = self.conn
        # (project, hour, name, bot) -> [events, person ids, session ids]; (project, dim, hour, value, bot) ->
        # [events, person ids]; person id -> [first ts, last ts, events]; session id -> as in _SESSION_CHANGES
        self.pending_groups: dict[tuple[int, int, int, int], list] = {}
        self.pending_dims: dict[tuple[int, int, int, int, int], list] = {}
        self.pending_persons: dict[int, list[int]] = {}
        self.pending_sessions: dict[int, list] = {}
        self.pending_since: float | None = None
        row = conn.execute("SELECT value FROM meta WHERE key = 'derived_through'").fetchone()
        self.derived_through = row[0] if row is not None else self.next_event_id - 1
        if self.derived_through >= self.next_event_id - 1:
            return
        found = conn.execute("SELECT id FROM strings WHERE value = ?", (PAGE_VIEW,)).fetchone()
        page_view = found[0] if found is not None else None
        for row in conn.execute(_UNWRITTEN, (self.derived_through,)):
            project_id, ts, name_id, person_id, session_id, path_id, referrer_id, agent_id, bot, url = row
            is_page = name_id == page_view
            self._count(project_id, ts, name_id, bot, person_id, session_id, agent_id, path_id if is_page else None)
            if session_id is not None:
                parts = split_url(url) if url is not None and is_page else None
                utm = (parts.utm_source, parts.utm_medium, parts.utm_campaign) if parts is not None else (None,) * 3
                self._count_in_session(session_id, ts, is_page, path_id, referrer_id, utm, agent_id)
        self.pending_since = time.monotonic()

    # -- interning -------------------------------------------------------------------------------

    def string_id(self, value: str) -> int:
        found = self.strings.get(value)
        if found is not None:
            return found
        row = self.conn.execute("SELECT id FROM strings WHERE value = ?", (value,)).fetchone()
        if row is None:
            self.conn.execute("INSERT INTO strings(value) VALUES (?)", (value,))
            found = self.conn.last_insert_rowid()
        else:
            found = row[0]
        self.strings[value] = found
        return found

    def opt_string_id(self, value: str | None) -> int | None:
        return None if value is None else self.string_id(value)

    def _count_in_session(self, session_id: int, ts: int, page_view: bool, path_id: int | None,
                          referrer_id: int | None, utm: tuple, agent_id: int) -> None:
        """Add one event to its session's kept changes; utm is (source, medium, campaign) of its page."""
        changes = self.pending_sessions
        delta = changes.get(session_id)
        if delta is None:
            delta = changes[session_id] = [ts, ts, 0, 0, None, None, None, None, None, None, None, None, agent_id]
        elif ts < delta[FIRST]:
            delta[FIRST] = ts
        elif ts > delta[LAST]:
            delta[LAST] = ts
        delta[EVENTS] += 1
        if page_view:
            delta[PAGEVIEWS] += 1
            if delta[ENTRY_TS] is None or ts < delta[ENTRY_TS]:
                source, medium, campaign = utm
                delta[ENTRY_TS:EXIT_TS] = (ts, path_id, referrer_id, self.opt_string_id(source),
                                           self.opt_string_id(medium), self.opt_string_id(campaign))
            if delta[EXIT_TS] is None or ts >= delta[EXIT_TS]:
                delta[EXIT_TS] = ts
                delta[EXIT_PATH] = path_id

    def agent(self, user_agent: str) -> tuple[int, bool]:
        found = self.agents.get(user_agent)
        if found is not None:
            return found
        info = parse_agent(user_agent)
        row = self.conn.execute("SELECT id FROM agents WHERE ua = ?", (user_agent,)).fetchone()
        if row is None:
            self.conn.execute(
                "INSERT INTO agents(ua, browser, os, device, is_bot) VALUES (?, ?, ?, ?, ?)",
                (user_agent, info.browser, info.os, info.device, int(info.is_bot)),
            )
            agent_id = self.conn.last_insert_rowid()
        else:
            agent_id = row[0]
        found = (agent_id, info.is_bot)
        self.agents[user_agent] = found
        return found

    def salt(self, day: int) -> bytes:
        found = self.salts.get(day)
        if found is not None:
            return found
        row = self.conn.execute("SELECT salt FROM salts WHERE day = ?", (day,)).fetchone()
        if row is None:
            found = secrets.token_bytes(16)
            self.conn.execute("INSERT INTO salts(day, salt) VALUES (?, ?)", (day, found))
            self.conn.execute("DELETE FROM salts WHERE day < ?", (day,))
        else:
            found = row[0]
        self.salts = {day: found}
        return found

    def compact(self) -> int:
        """Merge the rows of every key of both rollup tables kept in several rows; returns how many keys."""
        self.compacted_at = time.monotonic()
        return self.hourly.compact() + self.dims.compact()

    def _load(self, sql: str, wanted: dict[int, set[str]], caches: dict[int, dict[str, int]]) -> None:
        """Bring every wanted key of each project that exists into its cache, one query per 5000 keys."""
        for project_id, keys in wanted.items():
            cache = caches.setdefault(project_id, {})
            for chunk in _json_chunks(list(keys)):
                cache.update(self.conn.execute(sql, (project_id, chunk)))

    def _load_sessions(self, wanted: dict[int, set[str]]) -> None:
        """Like _load, keeping each session's first time too."""
        for project_id, keys in wanted.items():
            cache = self.sessions.setdefault(project_id, {})
            for chunk in _json_chunks(list(keys)):
                for key, session_id, first_ts in self.conn.execute(_LOOKUP_SESSIONS, (project_id, chunk)):
                    cache[key] = session_id
                    self.session_first[session_id] = (project_id, first_ts)

    def _stored_uuids(self, jobs: list[Submit]) -> set[tuple[int, bytes]]:
        """Which of the client-made uuids in the batch the project already has."""
        wanted: dict[int, list[str]] = {}
        for job in jobs:
            uuids = [ev[UID].hex() for ev in job.events if ev[UID] is not None]
            if uuids:
                wanted.setdefault(job.project_id, []).extend(uuids)
        found = set()
        for project_id, uuids in wanted.items():
            for chunk in _json_chunks(uuids):
                found.update((project_id, uid) for (uid,) in self.conn.execute(_STORED_UUIDS, (project_id, chunk)))
        return found

    # -- the batch --------------------------------------------------------------------------------

    def apply(self, jobs: list[Submit], *, flush: bool = True) -> list[tuple[int, int, list[int]]]:
        """Write the jobs in the current transaction; returns (job id, accepted, duplicate positions) per job.

        Events and new sessions and persons are always written. What they add to the hourly rollups and
        to sessions and persons (counts, times, entry and exit pages) is kept in memory unless `flush`,
        merged with what later commits add, so each rollup key and changed row is written once per flush
        rather than once per commit. A job whose project no longer exists writes nothing; its accepted
        count is PROJECT_GONE.
        """
        conn = self.conn
        now = time.monotonic()
        # a project deleted since the last commit: forget its ids and drop what was kept of its events
        # (gone with them), so no rollup, session or person row of it is written again
        version = catalog_version(conn)
        if version != self.catalog:
            self.reset()
            self.catalog = version
        # this write transaction waits for one deleting a project (SQLite's write lock), so jobs queued
        # for a project before the server noticed its delete find it gone here
        gone: list[tuple[int, int, list[int]]] = []
        if jobs:
            named = _encode(list({job.project_id for job in jobs})).decode()
            existing = {project_id for (project_id,) in conn.execute(_EXISTING_PROJECTS, (named,))}
            gone = [(job.job_id, PROJECT_GONE, []) for job in jobs if job.project_id not in existing]
            if gone:
                jobs = [job for job in jobs if job.project_id in existing]
        for caches in (self.persons, self.sessions):
            if sum(len(c) for c in caches.values()) > _CACHE_LIMIT:
                caches.clear()
                if caches is self.sessions:
                    self.session_first.clear()
        if len(self.strings) > _CACHE_LIMIT:
            self.strings.clear()
        for store in (self.hourly, self.dims):
            if len(store.cache) > _ROLLUP_CACHE_LIMIT and not store.uncompacted:
                store.cache.clear()

        # 1. every distinct id and session key the batch names, and every repeated uuid, looked up at once
        anonymous = []
        people: dict[int, set[str]] = {}
        session_keys: dict[int, set[str]] = {}
        for job in jobs:
            ip_hash = hashlib.sha256(
                b"%s%d\x00%s\x00%s" % (self.salt(job.received // DAY_MS), job.project_id, job.ip.encode(),
                                       job.user_agent.encode())
            ).digest()[:8]
            anonymous_id = "$ip:" + ip_hash.hex()
            anonymous.append((ip_hash, anonymous_id))
            known_people = self.persons.setdefault(job.project_id, {})
            known_sessions = self.sessions.setdefault(job.project_id, {})
            wanted = people.setdefault(job.project_id, set())
            keys = session_keys.setdefault(job.project_id, set())
            for ev in job.events:
                distinct_id = ev[DISTINCT_ID] or anonymous_id
                if distinct_id not in known_people:
                    wanted.add(distinct_id)
                if ev[ANON_ID] is not None and ev[ANON_ID] not in known_people:
                    wanted.add(ev[ANON_ID])
                if ev[SESSION_KEY] is not None and ev[SESSION_KEY] not in known_sessions:
                    keys.add(ev[SESSION_KEY])
        self._load(_LOOKUP_PEOPLE, people, self.persons)
        self._load_sessions(session_keys)
        seen = self._stored_uuids(jobs)

        # 2. one row per new event, and what it adds to rollups, persons and sessions
        self.new_persons: dict[int, list] = {}  # id -> [project, distinct_id, first ts]
        self.new_links: list[tuple[int, str, int]] = []
        self.renames: list[tuple[str, int]] = []
        self.new_sessions: dict[int, tuple[int, str, int]] = {}  # id -> (project, key, person)
        rows: list[tuple] = []
        results: list[tuple[int, int, list[int]]] = []
        count = self._count  # the batch's changes join those kept from earlier commits
        traits: list[tuple[str, int]] = []
        traited: set[int] = set()  # projects whose persons' traits change
        strings = self.strings
        string_id = self.string_id
        count_in_session = self._count_in_session
        event_id = self.next_event_id
        for index, job in enumerate(jobs):
            project_id = job.project_id
            received = job.received
            agent_id, is_bot = self.agent(job.user_agent)
            bot = int(is_bot)
            ip_hash, anonymous_id = anonymous[index]
            persons = self.persons[project_id]
            sessions = self.sessions[project_id]
            duplicates: list[int] = []
            for position, ev in enumerate(job.events):
                ts = ev[TS]
                uid = ev[UID]
                if uid is None:
                    uid = time_uuid(ts)
                else:
                    key = (project_id, uid)
                    if key in seen:
                        duplicates.append(position)
                        continue
                    seen.add(key)
                distinct_id = ev[DISTINCT_ID] or anonymous_id
                if ev[ANON_ID] is not None:
                    person_id = self._identify(project_id, distinct_id, ev[ANON_ID], ts)
                else:
                    person_id = persons.get(distinct_id) or self._new_person(project_id, distinct_id, ts)
                session_id = None
                session_key = ev[SESSION_KEY]
                if session_key is not None:
                    session_id = sessions.get(session_key) or self._new_session(project_id, session_key, person_id)
                name, url, path, referrer, referrer_domain = ev[NAME], ev[URL], ev[PATH], ev[REFERRER], ev[REFERRER_DOMAIN]
                name_id = strings.get(name) or string_id(name)
                path_id = None if path is None else (strings.get(path) or string_id(path))
                referrer_domain_id = None if referrer_domain is None else (
                    strings.get(referrer_domain) or string_id(referrer_domain))
                rows.append((
                    event_id, project_id, uid, ts, received, name_id, person_id, session_id,
                    None if url is None else (strings.get(url) or string_id(url)), path_id,
                    None if referrer is None else (strings.get(referrer) or string_id(referrer)),
                    referrer_domain_id, agent_id, ip_hash, ev[PROPS],
                ))
                event_id += 1

                page_view = name == PAGE_VIEW
                count(project_id, ts, name_id, bot, person_id, session_id, agent_id, path_id if page_view else None)
                if ev[TRAITS] is not None:
                    traits.append((ev[TRAITS], person_id))
                    traited.add(project_id)
                if session_id is not None:
                    count_in_session(session_id, ts, page_view, path_id, referrer_domain_id, ev[UTM_SOURCE:PROPS],
                                     agent_id)
            results.append((job.job_id, len(job.events) - len(duplicates), duplicates))
        self.next_event_id = event_id

        # 3. the rows, then everything derived from them
        before = conn.total_changes()
        conn.executemany(_INSERT_EVENT, rows)
        if conn.total_changes() - before != len(rows):
            raise RuntimeError("an event uuid was stored twice in one batch; the batch is rolled back")
        self._write_people(traits, traited, flush)
        self._write_sessions(flush)
        if flush:
            self._write_rollups()
            self.derived_through = event_id - 1
            conn.execute(_WRITTEN_THROUGH, (self.derived_through,))
            self.pending_since = None
        elif self.pending_since is None and self.unwritten:
            self.pending_since = now
        if now - self.compacted_at > COMPACT_EVERY_S and (self.hourly.uncompacted or self.dims.uncompacted):
            self.compact()
        return results + gone

    def _new_person(self, project_id: int, distinct_id: str, ts: int) -> int:
        person_id = self.next_person_id
        self.next_person_id += 1
        self.persons[project_id][distinct_id] = person_id
        self.new_persons[person_id] = [project_id, distinct_id, ts]
        self.new_links.append((project_id, distinct_id, person_id))
        return person_id

    def _link(self, project_id: int, distinct_id: str, person_id: int) -> None:
        self.persons[project_id][distinct_id] = person_id
        self.new_links.append((project_id, distinct_id, person_id))

    def _identify(self, project_id: int, distinct_id: str, anon_id: str, ts: int) -> int:
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
            known = self._new_person(project_id, distinct_id, ts)
        if anon is None and anon_id != distinct_id:
            self._link(project_id, anon_id, known)
        return known

    def _new_session(self, project_id: int, session_key: str, person_id: int) -> int:
        session_id = self.next_session_id
        self.next_session_id += 1
        self.sessions[project_id][session_key] = session_id
        self.new_sessions[session_id] = (project_id, session_key, person_id)
        return session_id

    def _count(self, project_id: int, ts: int, name_id: int, bot: int, person_id: int, session_id: int | None,
               agent_id: int, page_path_id: int | None) -> None:
        """Add one event to the kept rollup and person changes; page_path_id: its path if a page view."""
        hour = ts // HOUR_MS
        key = (project_id, hour, name_id, bot)
        group = self.pending_groups.get(key)
        if group is None:
            group = self.pending_groups[key] = [0, [], []]
        group[0] += 1
        group[1].append(person_id)
        if session_id is not None:
            group[2].append(session_id)
        dims = self.pending_dims
        by_agent = (project_id, DIM_AGENT, hour, agent_id, bot)
        for key in (by_agent,) if page_path_id is None else (by_agent, (project_id, DIM_PAGE, hour, page_path_id, bot)):
            dim = dims.get(key)
            if dim is None:
                dim = dims[key] = [0, []]
            dim[0] += 1
            dim[1].append(person_id)
        person = self.pending_persons.get(person_id)
        if person is None:
            self.pending_persons[person_id] = [ts, ts, 1]
        else:
            if ts < person[0]:
                person[0] = ts
            elif ts > person[1]:
                person[1] = ts
            person[2] += 1

    def _write_rollups(self) -> None:
        """Each key of both tables with kept events gets a row of what they add (per event and for all)."""
        groups, dims = self.pending_groups, self.pending_dims
        self.pending_groups, self.pending_dims = {}, {}
        deltas: dict[tuple[int, int, int, int], list] = {}
        for (project_id, hour, name_id, bot), (count, users, sessions) in groups.items():
            for key in ((project_id, hour, name_id, bot), (project_id, hour, 0, bot)):
                delta = deltas.get(key)
                if delta is None:
                    deltas[key] = [count, BitMap(users), BitMap(sessions)]
                else:
                    delta[0] += count
                    delta[1].update(users)
                    delta[2].update(sessions)
        seq = self.next_event_id  # unique per commit
        self.hourly.add(deltas, seq)
        self.dims.add({key: [count, BitMap(users), None] for key, (count, users) in dims.items()}, seq)

    def _write_people(self, traits: list[tuple[str, int]], traited: set[int], flush: bool) -> None:
        """Insert new persons and links, and if `flush` write every kept person change.

        A person made by a commit that does not flush is inserted with no events (its times are safe to
        apply twice); its count stays with the changes kept in memory."""
        conn = self.conn
        pending = self.pending_persons
        fresh = []
        for person_id, (project_id, distinct_id, ts) in self.new_persons.items():
            first, last, count = (pending.pop(person_id, None) if flush else pending.get(person_id)) or (ts, ts, 0)
            fresh.append((person_id, project_id, distinct_id, first, last, count if flush else 0))
        conn.executemany(_INSERT_PERSON, fresh)
        conn.executemany(_INSERT_PERSON_ID, self.new_links)
        if self.renames:
            conn.executemany(_RENAME_PERSON, self.renames)
        if flush:
            conn.executemany(_UPDATE_PERSON, [(p[0], p[1], p[2], person_id) for person_id, p in pending.items()])
            pending.clear()
        if traits:
            conn.executemany(_MERGE_TRAITS, traits)
            # readers keep who has which trait while this is unchanged
            conn.executemany(_TOUCH_TRAITS, [(f"traits:{project_id}", self.next_event_id) for project_id in traited])

    def _write_sessions(self, flush: bool) -> None:
        """Insert new sessions and if `flush` update every session with kept changes; marks the start days
        of the sessions written as changed.

        A session made by a commit that does not flush is inserted with no events or page views (its
        times and entry and exit pages are safe to apply twice); those stay with the changes kept."""
        pending = self.pending_sessions
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
                          entry_path, referrer, source, medium, campaign, exit_ts, exit_path, agent_id))
            first_seen[session_id] = (project_id, first)
            days.add((project_id, first // DAY_MS))
        self.conn.executemany(_INSERT_SESSION, fresh)
        if flush:
            self._update_sessions(days)
        generation = self.next_event_id  # above every earlier commit's
        self.conn.executemany(_TOUCH_SESSION_DAY, [(*day, generation) for day in days])

    def _update_sessions(self, days: set[tuple[int, int]]) -> None:
        """Write every kept session change; adds the start days of the sessions changed to `days`."""
        first_seen = self.session_first
        sessions, self.pending_sessions = self.pending_sessions, {}
        for chunk in _json_chunks([session_id for session_id in sessions if session_id not in first_seen]):
            for session_id, project_id, first_ts in self.conn.execute(_SESSION_FIRST, (chunk,)):
                first_seen[session_id] = (project_id, first_ts)
        extend, extend_later, full, full_later = [], [], [], []
        for session_id, delta in sessions.items():
            if session_id not in first_seen:  # deleted with its project since
                continue
            project_id, first = first_seen[session_id]
            days.add((project_id, first // DAY_MS))
            earlier = delta[FIRST] < first
            if earlier:  # an earlier event: the session now starts then
                first_seen[session_id] = (project_id, delta[FIRST])
                days.add((project_id, delta[FIRST] // DAY_MS))
            if delta[ENTRY_TS] is not None:
                (full if earlier else full_later).append((*delta, session_id))
            elif earlier:  # no page view: entry, exit and page views stay as they are
                extend.append((delta[FIRST], delta[LAST], delta[EVENTS], session_id))
            else:
                extend_later.append((delta[LAST], delta[EVENTS], session_id))
        self.conn.executemany(_EXTEND_SESSION, extend)
        self.conn.executemany(_EXTEND_LATER_SESSION, extend_later)
        self.conn.executemany(_UPDATE_SESSION, full)
        self.conn.executemany(_UPDATE_LATER_SESSION, full_later)
