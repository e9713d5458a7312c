"""How one group-commit batch becomes rows: events, interned strings, persons, sessions and hourly rollups.

Runs on the writer thread only. The caches here mirror committed rows; any failed transaction clears them.
"""

from __future__ import annotations

import hashlib
import time
import os
import random
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

import apsw
import msgspec
from pyroaring import BitMap

from pulse.enrich import UrlParts, parse_agent, referrer_host, split_url
from pulse.protocol import IngestEvent
from pulse.storage.projects import catalog_version

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
MAX_FUTURE_MS = 60_000
PAGE_VIEW = "page_view"
_CACHE_LIMIT = 200_000
_ROLLUP_CACHE_LIMIT = 20_000
COMPACT_EVERY_S = 2.0
CATALOG_CHECK_EVERY_S = 0.1

_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class IngestJob:
    """One request's events with what the server knows about the request."""

    project_id: int
    events: list[IngestEvent]
    received_ms: int
    skew_ms: int  # add to client timestamps (server clock minus client clock at send time)
    ip: str
    user_agent: str
    project_domain: str | None = None


@dataclass(slots=True)
class CommittedEvent:
    """What the live feed needs of an event that was committed."""

    project_id: int
    uuid: bytes
    ts: int
    event: str
    distinct_id: str
    path: str | None
    properties: dict | None
    browser: str
    os: str
    device: str


@dataclass(slots=True)
class Rollup:
    """The whole of one (project, hour, event, bot) key, and how many rows hold it."""

    events: int = 0
    users: BitMap = field(default_factory=BitMap)
    sessions: BitMap = field(default_factory=BitMap)
    rows: int = 0


# A session's changes within one batch, as a list (built per session per batch, so kept cheap):
# [first_ts, last_ts, events, pageviews, entry_ts, entry_path, entry_referrer, entry_source, entry_medium,
#  entry_campaign, exit_ts, exit_path, agent_id] -- the column order of _UPDATE_SESSION's parameters
FIRST, LAST, EVENTS, PAGEVIEWS, ENTRY_TS, ENTRY_PATH, ENTRY_REF, ENTRY_SRC, ENTRY_MED, ENTRY_CAMP, EXIT_TS, EXIT_PATH = range(12)


def to_ms(value: datetime | int | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


_random_bits = random.Random(os.urandom(32)).getrandbits  # uniqueness, not secrecy: no syscall per event


def time_uuid(ts_ms: int) -> bytes:
    """A UUIDv7: 48-bit millisecond time, version and variant bits, 74 random bits (index-friendly order)."""
    rand = _random_bits(74)
    return (
        (ts_ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | (rand & (1 << 62) - 1)
    ).to_bytes(16, "big")


_INSERT_EVENT = (
    "INSERT INTO events(id, project_id, uuid, ts, received, name_id, person_id, session_id, url_id, path_id,"
    " referrer_id, referrer_domain_id, agent_id, ip_hash, props)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(project_id, uuid) DO NOTHING"
)
_INSERT_HOURLY = (
    "INSERT INTO hourly(project_id, hour, name_id, bot, seq, events, users, sessions, user_set, session_set)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_LOAD_HOURLY = (
    "SELECT events, user_set, session_set FROM hourly WHERE project_id = ? AND hour = ? AND name_id = ? AND bot = ?"
)
_DELETE_HOURLY = "DELETE FROM hourly WHERE project_id = ? AND hour = ? AND name_id = ? AND bot = ?"
_LOOKUP_PEOPLE = (
    "SELECT distinct_id, person_id FROM person_ids"
    " WHERE project_id = ? AND distinct_id IN (SELECT value FROM json_each(?))"
)
_LOOKUP_SESSIONS = (
    "SELECT session_key, id FROM sessions WHERE project_id = ? AND session_key IN (SELECT value FROM json_each(?))"
)
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
_INSERT_SESSION = (
    "INSERT INTO sessions(id, project_id, session_key, person_id, first_ts, last_ts, events, pageviews,"
    " entry_ts, entry_path_id, referrer_id, utm_source_id, utm_medium_id, utm_campaign_id, exit_ts, exit_path_id,"
    " agent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLite evaluates every SET expression against the row as it was, so the CASEs all see the old entry_ts
_UPDATE_SESSION = """
UPDATE sessions SET
    first_ts = min(first_ts, ?1),
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


def _max_id(conn: apsw.Connection, table: str) -> int:
    return conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0


class BatchApplier:
    """Applies batches of ingest jobs inside the writer's transaction, keeping caches of interned ids.

    The writer is the only connection that inserts events, persons and sessions, so it hands out
    their ids itself: new rows are inserted once with their final values, and a duplicate event is
    recognised by its id missing after `INSERT … ON CONFLICT DO NOTHING`.
    """

    def __init__(self, conn: apsw.Connection, *, live: bool = False) -> None:
        self.conn = conn
        self.live = live  # build CommittedEvent records for the live feed
        self.catalog = -1
        self.reset()

    def reset(self) -> None:
        """Forget every cache; they are rebuilt from committed rows on demand."""
        self.strings: dict[str, int] = {}
        self.agents: dict[str, tuple[int, bool, str, str, str]] = {}
        self.persons: dict[tuple[int, str], int] = {}
        self.sessions: dict[tuple[int, str], int] = {}
        self.rollups: dict[tuple[int, int, int, int], Rollup] = {}
        self.salts: dict[int, bytes] = {}
        self.uncompacted: set[tuple[int, int, int, int]] = set()  # keys stored in more than one row
        self.compacted_at = time.monotonic()
        self.catalog_checked_at = 0.0
        self.next_event_id = _max_id(self.conn, "events") + 1
        self.next_person_id = _max_id(self.conn, "persons") + 1
        self.next_session_id = _max_id(self.conn, "sessions") + 1

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

    def agent(self, user_agent: str) -> tuple[int, bool, str, str, str]:
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
        found = (agent_id, info.is_bot, info.browser, info.os, info.device)
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

    def rollup(self, key: tuple[int, int, int, int]) -> Rollup:
        found = self.rollups.get(key)
        if found is not None:
            return found
        found = Rollup()
        for events, user_set, session_set in self.conn.execute(_LOAD_HOURLY, key):
            found.events += events
            found.users |= BitMap.deserialize(user_set)
            found.sessions |= BitMap.deserialize(session_set)
            found.rows += 1
        if found.rows > 1:
            self.uncompacted.add(key)
        self.rollups[key] = found
        return found

    def compact(self) -> int:
        """Rewrite every key kept in several rows as one row; returns how many keys were compacted."""
        keys = self.uncompacted
        self.uncompacted = set()
        rows = []
        for key in keys:
            rollup = self.rollup(key)
            rows.append((*key, 0, rollup.events, len(rollup.users), len(rollup.sessions),
                         rollup.users.serialize(), rollup.sessions.serialize()))
            rollup.rows = 1
        self.conn.executemany(_DELETE_HOURLY, list(keys))
        self.conn.executemany(_INSERT_HOURLY, rows)
        self.compacted_at = time.monotonic()
        return len(keys)

    def _load(self, sql: str, wanted: dict[int, set[str]], cache: dict[tuple[int, str], int]) -> None:
        """Bring every wanted (project, key) that exists into the cache, with one query per 5000 keys."""
        for project_id, keys in wanted.items():
            missing = [k for k in keys if (project_id, k) not in cache]
            for start in range(0, len(missing), 5000):
                chunk = _encode(missing[start:start + 5000]).decode()
                for key, found in self.conn.execute(sql, (project_id, chunk)):
                    cache[(project_id, key)] = found

    # -- the batch --------------------------------------------------------------------------------

    def apply(self, jobs: list[IngestJob]) -> tuple[list[tuple[int, int]], list[CommittedEvent]]:
        """Write the jobs in the current transaction; returns (accepted, duplicates) per job and the new events."""
        conn = self.conn
        now = time.monotonic()
        if now - self.catalog_checked_at > CATALOG_CHECK_EVERY_S:
            version = catalog_version(conn)
            if version != self.catalog:
                self.reset()
                self.catalog = version
            self.catalog_checked_at = now
        for cache in (self.strings, self.persons, self.sessions):
            if len(cache) > _CACHE_LIMIT:
                cache.clear()
        if len(self.rollups) > _ROLLUP_CACHE_LIMIT:
            self.rollups.clear()

        # 1. every distinct id and session key the batch names, looked up at once
        hashes = []
        people: dict[int, set[str]] = {}
        session_keys: dict[int, set[str]] = {}
        for job in jobs:
            ip_hash = hashlib.sha256(
                b"%s%d\x00%s\x00%s" % (self.salt(job.received_ms // DAY_MS), job.project_id, job.ip.encode(),
                                       job.user_agent.encode())
            ).digest()[:8]
            hashes.append(ip_hash)
            wanted = people.setdefault(job.project_id, set())
            keys = session_keys.setdefault(job.project_id, set())
            for ev in job.events:
                wanted.add(ev.distinct_id or "$ip:" + ip_hash.hex())
                if ev.anon_id is not None:
                    wanted.add(ev.anon_id)
                if ev.session_id is not None:
                    keys.add(ev.session_id)
        self._load(_LOOKUP_PEOPLE, people, self.persons)
        self._load(_LOOKUP_SESSIONS, session_keys, self.sessions)

        # 2. one row per event; new persons and sessions get their ids here
        self.new_persons: dict[int, list] = {}  # id -> [project, distinct_id, first ts]
        self.new_links: list[tuple[int, str, int]] = []
        self.renames: list[tuple[str, int]] = []
        self.new_sessions: dict[int, tuple[int, str, int]] = {}  # id -> (project, key, person)
        rows: list[tuple] = []
        extras: list[tuple] = []
        duplicates = [0] * len(jobs)
        seen: set[tuple[int, bytes]] = set()
        strings = self.strings
        persons = self.persons
        sessions = self.sessions
        string_id = self.string_id
        live = self.live
        event_id = self.next_event_id
        for index, job in enumerate(jobs):
            project_id = job.project_id
            received = job.received_ms
            skew = job.skew_ms
            agent_id, is_bot, browser, os_name, device = self.agent(job.user_agent)
            bot = int(is_bot)
            ip_hash = hashes[index]
            anonymous = "$ip:" + ip_hash.hex()
            for ev in job.events:
                ts = ev.timestamp
                if ts is None:
                    ts = received
                else:
                    if ts.__class__ is not int:
                        ts = to_ms(ts)
                    ts += skew
                    if ts > received + MAX_FUTURE_MS:
                        ts = received
                uid = ev.uuid.bytes if ev.uuid is not None else time_uuid(ts)
                key = (project_id, uid)
                if key in seen:
                    duplicates[index] += 1
                    continue
                seen.add(key)
                distinct_id = ev.distinct_id or anonymous
                if ev.anon_id is not None:
                    person_id = self._identify(project_id, distinct_id, ev.anon_id, ts)
                else:
                    person_id = persons.get((project_id, distinct_id)) or self._new_person(project_id, distinct_id, ts)
                session_id = None
                if ev.session_id is not None:
                    session_id = sessions.get((project_id, ev.session_id))
                    if session_id is None:
                        session_id = self._new_session(project_id, ev.session_id, person_id)
                path = url_id = referrer_domain = utm = page_host = None
                url = ev.page_url
                if url:
                    parts = split_url(url)
                    path, page_host = parts.path, parts.host
                    if parts.utm_source or parts.utm_medium or parts.utm_campaign:
                        utm = parts
                    url_id = strings.get(url) or string_id(url)
                elif ev.properties:
                    candidate = ev.properties.get("path")
                    if isinstance(candidate, str) and candidate:
                        path = candidate
                referrer = ev.referrer
                referrer_id = None
                if referrer:
                    referrer_id = strings.get(referrer) or string_id(referrer)
                    referrer_domain = referrer_host(referrer)
                    if referrer_domain is not None and referrer_domain in (page_host, job.project_domain):
                        referrer_domain = None  # self-referral
                name = ev.event
                props = _encode(ev.properties).decode() if ev.properties else None
                rows.append((
                    event_id, project_id, uid, ts, received, strings.get(name) or string_id(name), person_id,
                    session_id, url_id, None if path is None else (strings.get(path) or string_id(path)),
                    referrer_id, None if referrer_domain is None else string_id(referrer_domain),
                    agent_id, ip_hash, props,
                ))
                extras.append((
                    index, bot, name == PAGE_VIEW, utm, ev.traits,
                    CommittedEvent(project_id, uid, ts, name, distinct_id, path, ev.properties,
                                   browser, os_name, device) if live else None,
                ))
                event_id += 1
        self.next_event_id = event_id
        if rows:
            before = conn.total_changes()
            conn.executemany(_INSERT_EVENT, rows)
            if conn.total_changes() - before == len(rows):
                kept = zip(rows, extras)
            else:  # some uuids were already stored: keep only the rows that went in
                present = {r[0] for r in conn.execute(
                    "SELECT id FROM events WHERE id BETWEEN ? AND ?", (rows[0][0], rows[-1][0]))}
                kept = [(row, extra) for row, extra in zip(rows, extras) if row[0] in present]
                for row, extra in zip(rows, extras):
                    if row[0] not in present:
                        duplicates[extra[0]] += 1
        else:
            kept = []
        accepted = [0] * len(jobs)
        committed = self._derive(kept, accepted)
        if self.uncompacted and now - self.compacted_at > COMPACT_EVERY_S:
            self.compact()
        return list(zip(accepted, duplicates)), committed

    def _new_person(self, project_id: int, distinct_id: str, ts: int) -> int:
        person_id = self.next_person_id
        self.next_person_id += 1
        self.persons[(project_id, distinct_id)] = person_id
        self.new_persons[person_id] = [project_id, distinct_id, ts]
        self.new_links.append((project_id, distinct_id, person_id))
        return person_id

    def _link(self, project_id: int, distinct_id: str, person_id: int) -> None:
        self.persons[(project_id, distinct_id)] = person_id
        self.new_links.append((project_id, distinct_id, person_id))

    def _identify(self, project_id: int, distinct_id: str, anon_id: str, ts: int) -> int:
        """Link an anonymous id to a known id: both resolve to one person from now on."""
        known = self.persons.get((project_id, distinct_id))
        anon = self.persons.get((project_id, anon_id))
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
        self.sessions[(project_id, session_key)] = session_id
        self.new_sessions[session_id] = (project_id, session_key, person_id)
        return session_id

    def _derive(self, kept, accepted: list[int]) -> list[CommittedEvent]:
        """Update rollups, persons and sessions for the rows that were really inserted."""
        groups: dict[tuple[int, int, int, int], list] = {}
        persons: dict[int, list[int]] = {}
        traits: list[tuple[str, int]] = []
        sessions: dict[int, list] = {}
        committed: list[CommittedEvent] = []
        for row, extra in kept:
            project_id, ts, name_id, person_id, session_id = row[1], row[3], row[5], row[6], row[7]
            index, bot, page_view, utm, event_traits, live = extra
            accepted[index] += 1
            if live is not None:
                committed.append(live)
            key = (project_id, ts // HOUR_MS, name_id, bot)
            group = groups.get(key)
            if group is None:
                group = groups[key] = [0, [], []]
            group[0] += 1
            group[1].append(person_id)
            person = persons.get(person_id)
            if person is None:
                persons[person_id] = [ts, ts, 1]
            else:
                if ts < person[0]:
                    person[0] = ts
                elif ts > person[1]:
                    person[1] = ts
                person[2] += 1
            if event_traits:
                traits.append((_encode(event_traits).decode(), person_id))
            if session_id is not None:
                group[2].append(session_id)
                delta = sessions.get(session_id)
                if delta is None:
                    delta = sessions[session_id] = [ts, ts, 0, 0, None, None, None, None, None, None, None, None,
                                                    row[12]]
                elif ts < delta[FIRST]:
                    delta[FIRST] = ts
                elif ts > delta[LAST]:
                    delta[LAST] = ts
                delta[EVENTS] += 1
                if page_view:
                    delta[PAGEVIEWS] += 1
                    if delta[ENTRY_TS] is None or ts < delta[ENTRY_TS]:
                        delta[ENTRY_TS:EXIT_TS] = (ts, row[9], row[11], *self._utm_ids(utm))
                    if delta[EXIT_TS] is None or ts >= delta[EXIT_TS]:
                        delta[EXIT_TS] = ts
                        delta[EXIT_PATH] = row[9]
        self._write_rollups(groups)
        self._write_people(persons, traits)
        self._write_sessions(sessions)
        return committed

    def _utm_ids(self, utm: UrlParts | None) -> tuple[int | None, int | None, int | None]:
        if utm is None:
            return (None, None, None)
        return (self.opt_string_id(utm.utm_source), self.opt_string_id(utm.utm_medium),
                self.opt_string_id(utm.utm_campaign))

    def _write_rollups(self, groups: dict[tuple[int, int, int, int], list]) -> None:
        """One row per touched key holding what this commit adds: its events and the ids new to the key."""
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
        rows = []
        for key, (count, users, sessions) in deltas.items():
            rollup = self.rollup(key)
            users -= rollup.users
            sessions -= rollup.sessions
            rollup.events += count
            rollup.users |= users
            rollup.sessions |= sessions
            rollup.rows += 1
            if rollup.rows > 1:
                self.uncompacted.add(key)
            rows.append((*key, seq, count, len(users), len(sessions), users.serialize(), sessions.serialize()))
        self.conn.executemany(_INSERT_HOURLY, rows)

    def _write_people(self, persons: dict[int, list[int]], traits: list[tuple[str, int]]) -> None:
        conn = self.conn
        fresh = []
        for person_id, (project_id, distinct_id, ts) in self.new_persons.items():
            first, last, count = persons.pop(person_id, (ts, ts, 0))
            fresh.append((person_id, project_id, distinct_id, first, last, count))
        conn.executemany(_INSERT_PERSON, fresh)
        conn.executemany(_INSERT_PERSON_ID, self.new_links)
        if self.renames:
            conn.executemany(_RENAME_PERSON, self.renames)
        conn.executemany(_UPDATE_PERSON, [(p[0], p[1], p[2], person_id) for person_id, p in persons.items()])
        if traits:
            conn.executemany(_MERGE_TRAITS, traits)

    def _write_sessions(self, sessions: dict[int, list]) -> None:
        fresh = []
        for session_id, (project_id, key, person_id) in self.new_sessions.items():
            delta = sessions.pop(session_id, None)
            if delta is None:  # only duplicate events named it
                continue
            (first, last, events, pageviews, entry_ts, entry_path, referrer, source, medium, campaign,
             exit_ts, exit_path, agent_id) = delta
            fresh.append((session_id, project_id, key, person_id, first, last, events, pageviews, entry_ts,
                          entry_path, referrer, source, medium, campaign, exit_ts, exit_path, agent_id))
        self.conn.executemany(_INSERT_SESSION, fresh)
        self.conn.executemany(_UPDATE_SESSION, [(*delta, sid) for sid, delta in sessions.items()])
