"""How one group-commit batch becomes rows: events, interned strings, persons, sessions and hourly rollups.

Runs on the writer thread only. The caches here mirror committed rows; any failed transaction clears them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

import apsw
import msgspec
from pyroaring import BitMap

from pulse.enrich import parse_agent, referrer_host, split_url
from pulse.protocol import IngestEvent
from pulse.storage.projects import catalog_version

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
MAX_FUTURE_MS = 60_000
PAGE_VIEW = "page_view"
_CACHE_LIMIT = 200_000
_ROLLUP_CACHE_LIMIT = 20_000

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
    events: int = 0
    users: BitMap = field(default_factory=BitMap)
    sessions: BitMap = field(default_factory=BitMap)


@dataclass(slots=True)
class SessionDelta:
    first_ts: int
    last_ts: int
    events: int = 0
    pageviews: int = 0
    entry_ts: int | None = None
    entry_path: int | None = None
    entry_referrer: int | None = None
    entry_source: int | None = None
    entry_medium: int | None = None
    entry_campaign: int | None = None
    exit_ts: int | None = None
    exit_path: int | None = None
    agent_id: int | None = None


def to_ms(value: datetime | int | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def time_uuid(ts_ms: int) -> bytes:
    """A UUIDv7: 48-bit millisecond time, version and variant bits, random rest (index-friendly order)."""
    raw = bytearray(ts_ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)
    raw[8] = 0x80 | (raw[8] & 0x3F)
    return bytes(raw)


_INSERT_EVENT = (
    "INSERT INTO events(id, project_id, uuid, ts, received, name_id, person_id, session_id, url_id, path_id,"
    " referrer_id, referrer_domain_id, agent_id, ip_hash, props)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(project_id, uuid) DO NOTHING"
)
_UPSERT_HOURLY = (
    "INSERT INTO hourly(project_id, hour, name_id, bot, events, users, sessions, user_set, session_set)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(project_id, hour, name_id, bot) DO UPDATE SET events = excluded.events,"
    " users = excluded.users, sessions = excluded.sessions,"
    " user_set = excluded.user_set, session_set = excluded.session_set"
)
_UPDATE_PERSON = (
    "UPDATE persons SET first_seen = min(first_seen, ?), last_seen = max(last_seen, ?),"
    " event_count = event_count + ? WHERE id = ?"
)
_MERGE_TRAITS = "UPDATE persons SET traits = json_patch(coalesce(traits, '{}'), ?) WHERE id = ?"
_UPDATE_SESSION = """
UPDATE sessions SET
    first_ts = min(first_ts, :first_ts),
    last_ts = max(last_ts, :last_ts),
    events = events + :events,
    pageviews = pageviews + :pageviews,
    entry_path_id = CASE WHEN :entry_ts IS NOT NULL AND (entry_ts IS NULL OR :entry_ts < entry_ts)
        THEN :entry_path ELSE entry_path_id END,
    referrer_id = CASE WHEN :entry_ts IS NOT NULL AND (entry_ts IS NULL OR :entry_ts < entry_ts)
        THEN :entry_referrer ELSE referrer_id END,
    utm_source_id = CASE WHEN :entry_ts IS NOT NULL AND (entry_ts IS NULL OR :entry_ts < entry_ts)
        THEN :entry_source ELSE utm_source_id END,
    utm_medium_id = CASE WHEN :entry_ts IS NOT NULL AND (entry_ts IS NULL OR :entry_ts < entry_ts)
        THEN :entry_medium ELSE utm_medium_id END,
    utm_campaign_id = CASE WHEN :entry_ts IS NOT NULL AND (entry_ts IS NULL OR :entry_ts < entry_ts)
        THEN :entry_campaign ELSE utm_campaign_id END,
    entry_ts = CASE WHEN :entry_ts IS NOT NULL AND (entry_ts IS NULL OR :entry_ts < entry_ts)
        THEN :entry_ts ELSE entry_ts END,
    exit_path_id = CASE WHEN :exit_ts IS NOT NULL AND (exit_ts IS NULL OR :exit_ts >= exit_ts)
        THEN :exit_path ELSE exit_path_id END,
    exit_ts = CASE WHEN :exit_ts IS NOT NULL AND (exit_ts IS NULL OR :exit_ts >= exit_ts)
        THEN :exit_ts ELSE exit_ts END,
    agent_id = coalesce(agent_id, :agent_id)
WHERE id = :id
"""


class BatchApplier:
    """Applies batches of ingest jobs inside the writer's transaction, keeping caches of interned ids."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        self.catalog = -1
        self.next_event_id = 0
        self.reset()

    def reset(self) -> None:
        """Forget every cache; they are rebuilt from committed rows on demand."""
        self.strings: dict[str, int] = {}
        self.agents: dict[str, tuple[int, bool, str, str, str]] = {}
        self.persons: dict[tuple[int, str], int] = {}
        self.sessions: dict[tuple[int, str], int] = {}
        self.rollups: dict[tuple[int, int, int, int], Rollup] = {}
        self.salts: dict[int, bytes] = {}
        row = self.conn.execute("SELECT max(id) FROM events").fetchone()
        self.next_event_id = (row[0] or 0) + 1

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
        if len(self.strings) > _CACHE_LIMIT:
            self.strings.clear()
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
        if len(self.agents) > 10_000:
            self.agents.clear()
        found = (agent_id, info.is_bot, info.browser, info.os, info.device)
        self.agents[user_agent] = found
        return found

    def _lookup_person(self, project_id: int, distinct_id: str) -> int | None:
        key = (project_id, distinct_id)
        found = self.persons.get(key)
        if found is None:
            row = self.conn.execute(
                "SELECT person_id FROM person_ids WHERE project_id = ? AND distinct_id = ?", key
            ).fetchone()
            if row is not None:
                found = row[0]
                self._remember_person(key, found)
        return found

    def _remember_person(self, key: tuple[int, str], person_id: int) -> None:
        if len(self.persons) > _CACHE_LIMIT:
            self.persons.clear()
        self.persons[key] = person_id

    def _link(self, project_id: int, distinct_id: str, person_id: int) -> None:
        self.conn.execute(
            "INSERT INTO person_ids(project_id, distinct_id, person_id) VALUES (?, ?, ?)",
            (project_id, distinct_id, person_id),
        )
        self._remember_person((project_id, distinct_id), person_id)

    def person_id(self, project_id: int, distinct_id: str, ts: int) -> int:
        found = self._lookup_person(project_id, distinct_id)
        if found is not None:
            return found
        self.conn.execute(
            "INSERT INTO persons(project_id, distinct_id, first_seen, last_seen) VALUES (?, ?, ?, ?)",
            (project_id, distinct_id, ts, ts),
        )
        found = self.conn.last_insert_rowid()
        self._link(project_id, distinct_id, found)
        return found

    def identify(self, project_id: int, distinct_id: str, anon_id: str, ts: int) -> int:
        """Link an anonymous id to a known id: both resolve to one person from now on."""
        known = self._lookup_person(project_id, distinct_id)
        anon = self._lookup_person(project_id, anon_id)
        if known is None and anon is not None:
            self._link(project_id, distinct_id, anon)
            self.conn.execute("UPDATE persons SET distinct_id = ? WHERE id = ?", (distinct_id, anon))
            return anon
        if known is None:
            known = self.person_id(project_id, distinct_id, ts)
        if anon is None and anon_id != distinct_id:
            self._link(project_id, anon_id, known)
        return known

    def session_id(self, project_id: int, session_key: str, person_id: int, ts: int) -> int:
        key = (project_id, session_key)
        found = self.sessions.get(key)
        if found is not None:
            return found
        row = self.conn.execute(
            "SELECT id FROM sessions WHERE project_id = ? AND session_key = ?", key
        ).fetchone()
        if row is None:
            self.conn.execute(
                "INSERT INTO sessions(project_id, session_key, person_id, first_ts, last_ts) VALUES (?, ?, ?, ?, ?)",
                (project_id, session_key, person_id, ts, ts),
            )
            found = self.conn.last_insert_rowid()
        else:
            found = row[0]
        if len(self.sessions) > _CACHE_LIMIT:
            self.sessions.clear()
        self.sessions[key] = found
        return found

    def rollup(self, key: tuple[int, int, int, int]) -> Rollup:
        found = self.rollups.get(key)
        if found is not None:
            return found
        row = self.conn.execute(
            "SELECT events, user_set, session_set FROM hourly"
            " WHERE project_id = ? AND hour = ? AND name_id = ? AND bot = ?",
            key,
        ).fetchone()
        if row is None:
            found = Rollup()
        else:
            found = Rollup(row[0], BitMap.deserialize(row[1]), BitMap.deserialize(row[2]))
        if len(self.rollups) > _ROLLUP_CACHE_LIMIT:
            self.rollups.clear()
        self.rollups[key] = found
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

    # -- the batch --------------------------------------------------------------------------------

    def apply(self, jobs: list[IngestJob]) -> tuple[list[tuple[int, int]], list[CommittedEvent]]:
        """Write the jobs in the current transaction; returns (accepted, duplicates) per job and the new events."""
        conn = self.conn
        version = catalog_version(conn)
        if version != self.catalog:
            self.reset()
            self.catalog = version
        rows: list[tuple] = []
        extras: list[tuple] = []  # per row: job index, bot, is page view, session entry data, committed event
        duplicates = [0] * len(jobs)
        seen: set[tuple[int, bytes]] = set()
        event_id = self.next_event_id
        for index, job in enumerate(jobs):
            project_id = job.project_id
            agent_id, is_bot, browser, os_name, device = self.agent(job.user_agent)
            day = job.received_ms // DAY_MS
            ip_hash = hashlib.sha256(
                b"%s%d\x00%s\x00%s" % (self.salt(day), project_id, job.ip.encode(), job.user_agent.encode())
            ).digest()[:8]
            for ev in job.events:
                ts = to_ms(ev.timestamp)
                if ts is None:
                    ts = job.received_ms
                else:
                    ts += job.skew_ms
                    if ts > job.received_ms + MAX_FUTURE_MS:
                        ts = job.received_ms
                uid = ev.uuid.bytes if ev.uuid is not None else time_uuid(ts)
                if (project_id, uid) in seen:
                    duplicates[index] += 1
                    continue
                seen.add((project_id, uid))
                distinct_id = ev.distinct_id or "$ip:" + ip_hash.hex()
                if ev.anon_id is not None:
                    person_id = self.identify(project_id, distinct_id, ev.anon_id, ts)
                else:
                    person_id = self.person_id(project_id, distinct_id, ts)
                session_id = (
                    self.session_id(project_id, ev.session_id, person_id, ts) if ev.session_id is not None else None
                )
                path = source = medium = campaign = referrer_domain = None
                url_id = None
                if ev.page_url:
                    parts = split_url(ev.page_url)
                    path, source, medium, campaign = parts.path, parts.utm_source, parts.utm_medium, parts.utm_campaign
                    url_id = self.string_id(ev.page_url)
                    page_host = parts.host
                else:
                    page_host = None
                if path is None and ev.properties:
                    candidate = ev.properties.get("path")
                    if isinstance(candidate, str) and candidate:
                        path = candidate
                if ev.referrer:
                    referrer_domain = referrer_host(ev.referrer)
                    if referrer_domain is not None and referrer_domain in (page_host, job.project_domain):
                        referrer_domain = None  # self-referral
                path_id = self.opt_string_id(path)
                referrer_domain_id = self.opt_string_id(referrer_domain)
                props = _encode(ev.properties).decode() if ev.properties else None
                rows.append((
                    event_id, project_id, uid, ts, job.received_ms, self.string_id(ev.event), person_id, session_id,
                    url_id, path_id, self.opt_string_id(ev.referrer), referrer_domain_id, agent_id, ip_hash, props,
                ))
                extras.append((
                    index, int(is_bot), ev.event == PAGE_VIEW, source, medium, campaign, ev.traits,
                    CommittedEvent(project_id, uid, ts, ev.event, distinct_id, path, ev.properties,
                                   browser, os_name, device),
                ))
                event_id += 1
        self.next_event_id = event_id
        if not rows:
            return [(0, duplicates[i]) for i in range(len(jobs))], []

        before = conn.total_changes()
        conn.executemany(_INSERT_EVENT, rows)
        if conn.total_changes() - before != len(rows):
            present = {
                r[0] for r in conn.execute("SELECT id FROM events WHERE id BETWEEN ? AND ?", (rows[0][0], rows[-1][0]))
            }
            kept = [(row, extra) for row, extra in zip(rows, extras) if row[0] in present]
            for row, extra in zip(rows, extras):
                if row[0] not in present:
                    duplicates[extra[0]] += 1
        else:
            kept = list(zip(rows, extras))
        accepted = [0] * len(jobs)
        committed = self._derive(kept, accepted)
        return list(zip(accepted, duplicates)), committed

    def _derive(self, kept: list[tuple[tuple, tuple]], accepted: list[int]) -> list[CommittedEvent]:
        """Update rollups, persons and sessions for the rows that were really inserted."""
        dirty: dict[tuple[int, int, int, int], Rollup] = {}
        persons: dict[int, list[int]] = {}
        traits: list[tuple[str, int]] = []
        sessions: dict[int, SessionDelta] = {}
        committed: list[CommittedEvent] = []
        for row, extra in kept:
            (_, project_id, _, ts, _, name_id, person_id, session_id, _, path_id, _, referrer_domain_id,
             agent_id, _, _) = row
            index, bot, is_pageview, source, medium, campaign, event_traits, live = extra
            accepted[index] += 1
            committed.append(live)
            hour = ts // HOUR_MS
            for key in ((project_id, hour, name_id, bot), (project_id, hour, 0, bot)):
                rollup = dirty.get(key)
                if rollup is None:
                    rollup = dirty[key] = self.rollup(key)
                rollup.events += 1
                rollup.users.add(person_id)
                if session_id is not None:
                    rollup.sessions.add(session_id)
            person = persons.get(person_id)
            if person is None:
                persons[person_id] = [ts, ts, 1]
            else:
                if ts < person[0]:
                    person[0] = ts
                if ts > person[1]:
                    person[1] = ts
                person[2] += 1
            if event_traits:
                traits.append((_encode(event_traits).decode(), person_id))
            if session_id is not None:
                delta = sessions.get(session_id)
                if delta is None:
                    delta = sessions[session_id] = SessionDelta(ts, ts, agent_id=agent_id)
                delta.first_ts = min(delta.first_ts, ts)
                delta.last_ts = max(delta.last_ts, ts)
                delta.events += 1
                if is_pageview:
                    delta.pageviews += 1
                    if delta.entry_ts is None or ts < delta.entry_ts:
                        delta.entry_ts, delta.entry_path, delta.entry_referrer = ts, path_id, referrer_domain_id
                        delta.entry_source = self.opt_string_id(source)
                        delta.entry_medium = self.opt_string_id(medium)
                        delta.entry_campaign = self.opt_string_id(campaign)
                    if delta.exit_ts is None or ts >= delta.exit_ts:
                        delta.exit_ts, delta.exit_path = ts, path_id
        conn = self.conn
        conn.executemany(_UPSERT_HOURLY, [
            (*key, r.events, len(r.users), len(r.sessions), r.users.serialize(), r.sessions.serialize())
            for key, r in dirty.items()
        ])
        conn.executemany(_UPDATE_PERSON, [(p[0], p[1], p[2], pid) for pid, p in persons.items()])
        if traits:
            conn.executemany(_MERGE_TRAITS, traits)
        if sessions:
            conn.executemany(_UPDATE_SESSION, [
                {
                    "id": sid, "first_ts": d.first_ts, "last_ts": d.last_ts, "events": d.events,
                    "pageviews": d.pageviews, "entry_ts": d.entry_ts, "entry_path": d.entry_path,
                    "entry_referrer": d.entry_referrer, "entry_source": d.entry_source,
                    "entry_medium": d.entry_medium, "entry_campaign": d.entry_campaign,
                    "exit_ts": d.exit_ts, "exit_path": d.exit_path, "agent_id": d.agent_id,
                }
                for sid, d in sessions.items()
            ])
        return committed
