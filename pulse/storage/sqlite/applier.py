"""How one group commit becomes rows: events, interned strings, persons, sessions and hourly rollups.

Runs in the writer process only, inside the writer's transaction. The caches here mirror committed
rows; any failed transaction clears them (BatchApplier.reset).
"""

from __future__ import annotations

import hashlib
import time

import apsw
import msgspec

from pulse.enrich import split_url
from pulse.storage.model import DAY_MS, PAGE_VIEW
from pulse.storage.sqlite.projects import catalog_version
from pulse.storage.sqlite.identities import INFERRED, Identities
from pulse.storage.sqlite.interning import Interner, json_chunks
from pulse.storage.sqlite.rollup_sets import RollupSets
from pulse.storage.sqlite.rows import ANON_ID, DISTINCT_ID, SESSION_KEY, UID, time_uuid
from pulse.storage.sqlite.wire import PROJECT_GONE, Submit
from pulse.storage.sqlite.write_behind import (
    DRAIN_SLICE_ROWS, READ_DERIVED_THROUGH, READ_ROWS_THROUGH, ROWS_AFTER_S, ROWS_LIMIT, SLICE_ROWS,
    WRITE_DERIVED_THROUGH, WRITE_ROWS_THROUGH, Kept, due,
)

_encode = msgspec.json.Encoder().encode

_INSERT_EVENT = (
    "INSERT INTO events(id, project_id, uuid, ts, received, name_id, person_id, session_id, url_id, path_id,"
    " referrer_id, referrer_domain_id, agent_id, ip_hash, props, country_id, language_id, screen_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(project_id, uuid) DO NOTHING"  # never skips: repeats were found first; checked after
)
_STORED_UUIDS = (
    "SELECT uuid FROM events WHERE project_id = ? AND uuid IN (SELECT unhex(value) FROM json_each(?))"
)
_UNWRITTEN = (
    "SELECT e.id, e.project_id, e.ts, e.name_id, e.person_id, e.session_id, e.path_id, e.referrer_domain_id,"
    " e.agent_id,"
    " coalesce(a.is_bot, 0), u.value, e.country_id, e.language_id, e.screen_id FROM events e LEFT JOIN agents a ON a.id = e.agent_id"
    " LEFT JOIN strings u ON u.id = e.url_id"
    " WHERE e.id > ? ORDER BY e.id"
)
_HIGHEST = (
    "SELECT coalesce((SELECT max(id) FROM events), 0),"
    " coalesce((SELECT max(value) FROM meta WHERE key IN ('derived_through', 'rows_through')), 0)"
)
_HIGHEST_DAY_GENERATION = "SELECT coalesce(max(generation), 0) FROM session_days"
_EXISTING_PROJECTS = "SELECT id FROM projects WHERE id IN (SELECT value FROM json_each(?))"
# the marks of the persons and sessions of the events after an event id (see write_behind)
_PERSON_MARKS = "SELECT id, derived_through FROM persons WHERE id IN (SELECT person_id FROM events WHERE id > ?)"
_SESSION_MARKS = "SELECT id, derived_through FROM sessions WHERE id IN (SELECT session_id FROM events WHERE id > ?)"

# per job: (job id, events accepted or PROJECT_GONE, positions of duplicates)
Result = tuple[int, int, list[int]]


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
        self.interner = Interner(self.conn)
        self.identities = Identities(self.conn)
        self.rollups = RollupSets(self.conn)
        # never below the marks: deleting the project with the newest events must not hand out ids that the
        # marks say are written already (its rollup rows' seq, too, must go on rising)
        self.next_event_id = max(self.conn.execute(_HIGHEST).fetchone()) + 1
        # the generation last given to a session start day (see _touch_days)
        self.day_generation = self.conn.execute(_HIGHEST_DAY_GENERATION).fetchone()[0]
        self._replay()

    def compact(self) -> int:
        """Merge the rows of every key of both rollup tables kept in several rows; returns how many keys."""
        return self.rollups.compact()

    # -- rollup, session and person changes written behind the events (see write_behind) --------

    @property
    def last_event(self) -> int:
        """The id of the last event stored."""
        return self.next_event_id - 1

    @property
    def written_through(self) -> int:
        """The last event whose every change (rollups, sessions, persons) is written."""
        return min(self.kept.derived_through, self.kept.rows_through)

    @property
    def unwritten(self) -> int:
        """How many stored events have rollup, session or person changes kept in memory, not yet written."""
        return self.next_event_id - 1 - min(self.kept.derived_through, self.kept.rows_through)

    def _replay(self) -> None:
        """Rebuild the changes kept in memory from the events stored after the marks (see write_behind).

        They were lost with a crashed writer or a rolled-back transaction; the events that make them are
        on disk, and every session and person row holds nothing of them but idempotent times. The persons'
        current inferred sessions follow from the sessions' times, the kept changes included.
        """
        conn = self.conn
        last = self.next_event_id - 1
        row = conn.execute(READ_DERIVED_THROUGH).fetchone()
        derived_through = row[0] if row is not None else last
        row = conn.execute(READ_ROWS_THROUGH).fetchone()
        rows_through = row[0] if row is not None else derived_through
        self.kept = kept = Kept(self.interner.opt_string_id, derived_through, rows_through)
        start = min(derived_through, rows_through)
        if start >= last:
            return
        person_marks = dict(conn.execute(_PERSON_MARKS, (start,)))
        session_marks = dict(conn.execute(_SESSION_MARKS, (start,)))
        found = conn.execute("SELECT id FROM strings WHERE value = ?", (PAGE_VIEW,)).fetchone()
        page_view = found[0] if found is not None else None
        for row in conn.execute(_UNWRITTEN, (start,)):
            (event_id, project_id, ts, name_id, person_id, session_id, path_id, referrer_id, agent_id, bot, url,
             country_id, language_id, screen_id) = row
            is_page = name_id == page_view
            if event_id > derived_through:
                kept.count_rollup(project_id, ts, name_id, bot, person_id, session_id, agent_id,
                                  path_id if is_page else None, country_id, language_id, screen_id)
            if event_id > person_marks.get(person_id, 0):
                kept.count_person(person_id, ts)
            if session_id is not None and event_id > session_marks.get(session_id, 0):
                parts = split_url(url) if url is not None and is_page else None
                utm = (parts.utm_source, parts.utm_medium, parts.utm_campaign) if parts is not None else (None,) * 3
                kept.count_in_session(session_id, ts, is_page, path_id, referrer_id, *utm, agent_id)
        self.identities.rebuild_current(set(kept.sessions), kept)
        kept.since = kept.rows_since = time.monotonic()

    # -- the batch --------------------------------------------------------------------------------

    def apply(self, jobs: list[Submit], *, flush: bool = True, drain: bool = False) -> list[Result]:
        """Write the jobs in the current transaction; returns (job id, accepted, duplicate positions) per job.

        Events and new sessions and persons are always written; what they add to rollups, sessions and
        persons is kept in memory and written when due, everything if `flush`, and if `drain` (a read waits)
        the rollups and a larger slice of what is kept of sessions and persons (see write_behind). A job whose
        project no longer exists writes nothing; its accepted count is PROJECT_GONE.
        """
        now = time.monotonic()
        self._follow_catalog()
        jobs, gone = self._drop_gone_projects(jobs)
        self._trim_caches()
        anonymous = self._look_up(jobs)
        seen = self._stored_uuids(jobs)
        identities, kept = self.identities, self.kept
        identities.begin()
        rows, results, traits, traited = self._resolve_and_count(jobs, anonymous, seen)
        self._insert_events(rows)
        last = self.next_event_id - 1
        identities.write_people(kept, traits, traited, flush, last, self.next_event_id)
        days = identities.write_sessions(kept, flush, last)
        if flush:
            self._write_rows(*kept.take_sealed(), kept.sealed_through, days)
            self._write_rows(kept.persons, kept.sessions, last, days)
            kept.rows_since = None
            self._rows_through(last)
            self._flush()
            identities.trim_current(set)
        else:
            if kept.since is None and last > kept.derived_through:
                kept.since = now
            if kept.rows_since is None and (kept.persons or kept.sessions):
                kept.rows_since = now
            if drain or due(last - kept.derived_through, 0.0 if kept.since is None else now - kept.since):
                self._flush()
            self._write_slice(now, last, days, drain, 2 * len(rows))
            identities.trim_current(lambda: set(kept.sessions) | set(kept.sealed_sessions))
        self._touch_days(days)
        if self.rollups.compact_due(now):
            self.compact()
        return results + gone

    def _touch_days(self, days: set[tuple[int, int]]) -> None:
        """Give the start days of the sessions this commit changed a generation above every earlier commit's. The
        next event id alone is not: a commit that writes kept changes and no new event (a read's flush, the idle
        one, a slice) has the same as the commit before it, and a day a reader cached in between would be
        taken as unchanged."""
        if days:
            self.day_generation = max(self.next_event_id, self.day_generation + 1)
            self.identities.touch_days(days, self.day_generation)

    def _write_rows(self, persons: dict[int, list[int]], sessions: dict[int, list], mark: int,
                    days: set[tuple[int, int]]) -> None:
        """Write these kept person and session changes (each row's through the event `mark`) and forget them."""
        self.identities.update_persons(persons, mark)
        self.identities.update_sessions(sessions, mark, days)
        persons.clear()
        sessions.clear()

    def _write_slice(self, now: float, last: int, days: set[tuple[int, int]], drain: bool, added: int) -> None:
        """Write up to SLICE_ROWS rows (DRAIN_SLICE_ROWS if `drain`) of the sealed session and person changes,
        and never fewer than this commit's events may have changed (`added`), so what is sealed is written at
        least as fast as new changes gather, however large the commits; seal the kept ones when they are due
        (or `drain`) and nothing is sealed (see write_behind)."""
        kept = self.kept
        if not kept.sealed_persons and not kept.sealed_sessions:
            if not kept.persons and not kept.sessions:
                self._rows_through(last)
                return
            if (not drain and now - (kept.rows_since or now) < ROWS_AFTER_S
                    and len(kept.persons) + len(kept.sessions) < ROWS_LIMIT):
                return
            kept.seal(last)
        size = max(DRAIN_SLICE_ROWS if drain else SLICE_ROWS, added)
        persons, sessions = kept.take_sealed(size)
        self._write_rows(persons, sessions, kept.sealed_through, days)
        if not kept.sealed_persons and not kept.sealed_sessions:
            self._rows_through(kept.sealed_through)

    def _rows_through(self, through: int) -> None:
        """Every session and person change of the events up to `through` is written (in this transaction)."""
        if through != self.kept.rows_through:
            self.conn.execute(WRITE_ROWS_THROUGH, (through,))
            self.kept.rows_through = through

    def _follow_catalog(self) -> None:
        """A project deleted since the last commit: forget its ids and drop what was kept of its events
        (gone with them), so no rollup, session or person row of it is written again."""
        version = catalog_version(self.conn)
        if version != self.catalog:
            self.reset()
            self.catalog = version

    def _drop_gone_projects(self, jobs: list[Submit]) -> tuple[list[Submit], list[Result]]:
        """The jobs whose project exists, and PROJECT_GONE results for the others.

        This write transaction waits for one deleting a project (SQLite's write lock), so jobs queued
        for a project before the server noticed its delete find it gone here."""
        if not jobs:
            return jobs, []
        named = _encode(list({job.project_id for job in jobs})).decode()
        existing = {project_id for (project_id,) in self.conn.execute(_EXISTING_PROJECTS, (named,))}
        gone = [(job.job_id, PROJECT_GONE, []) for job in jobs if job.project_id not in existing]
        if gone:
            jobs = [job for job in jobs if job.project_id in existing]
        return jobs, gone

    def _trim_caches(self) -> None:
        self.identities.trim()
        self.interner.trim()
        self.rollups.trim()

    def _look_up(self, jobs: list[Submit]) -> list[tuple[bytes, str]]:
        """Load every distinct id and session key the batch names that the caches lack, at once, and the current
        inferred sessions of the persons of events without a session key; returns each job's ip hash and the
        distinct id of its events that have none. Set operations in C find what is missing: most of a busy
        site's ids are cached, and this runs for every event."""
        identities = self.identities
        anonymous = []
        people: dict[int, set[str]] = {}
        session_keys: dict[int, set[str]] = {}
        keyless: dict[int, set[str]] = {}
        for job in jobs:
            project_id, events = job.project_id, job.events
            ip_hash = hashlib.sha256(
                b"%s%d\x00%s\x00%s" % (self.interner.salt(job.received // DAY_MS), project_id, job.ip.encode(),
                                       job.user_agent.encode())
            ).digest()[:8]
            anonymous_id = "$ip:" + ip_hash.hex()
            anonymous.append((ip_hash, anonymous_id))
            known_people = identities.persons.setdefault(project_id, {})
            known_sessions = identities.sessions.setdefault(project_id, {})
            named = {ev[DISTINCT_ID] or anonymous_id for ev in events}
            anon_ids = {ev[ANON_ID] for ev in events}
            anon_ids.discard(None)
            named |= anon_ids
            missing = named.difference(known_people)  # a dict: each name looked up in it
            if missing:
                people.setdefault(project_id, set()).update(missing)
            keys = {ev[SESSION_KEY] for ev in events}
            if None in keys or any(key.startswith(INFERRED) for key in keys if key is not None):
                without = [ev for ev in events if ev[SESSION_KEY] is None or ev[SESSION_KEY].startswith(INFERRED)]
                found = keyless.setdefault(project_id, set())
                found.update(ev[DISTINCT_ID] or anonymous_id for ev in without)
                found.update(ev[ANON_ID] for ev in without if ev[ANON_ID] is not None)
                keys = {key for key in keys if key is not None and not key.startswith(INFERRED)}
            missing = keys.difference(known_sessions)
            if missing:
                session_keys.setdefault(project_id, set()).update(missing)
        identities.load(people, session_keys, keyless)
        return anonymous

    def _stored_uuids(self, jobs: list[Submit]) -> set[tuple[int, bytes]]:
        """Which of the client-made uuids in the batch the project already has."""
        wanted: dict[int, list[str]] = {}
        for job in jobs:
            uuids = [ev[UID].hex() for ev in job.events if ev[UID] is not None]
            if uuids:
                wanted.setdefault(job.project_id, []).extend(uuids)
        found = set()
        for project_id, uuids in wanted.items():
            for chunk in json_chunks(uuids):
                found.update((project_id, uid) for (uid,) in self.conn.execute(_STORED_UUIDS, (project_id, chunk)))
        return found

    def _resolve_and_count(self, jobs: list[Submit], anonymous: list[tuple[bytes, str]],
                           seen: set[tuple[int, bytes]]) -> tuple[list[tuple], list[Result], list, set[int]]:
        """One row per new event, with its person, session and string ids, and what it adds to rollups,
        persons and sessions counted into the changes kept from earlier commits.

        Returns the rows, each job's result, the traits to merge as (traits, person id), and the projects
        whose persons' traits change."""
        rows: list[tuple] = []
        results: list[Result] = []
        merged: list[tuple[str, int]] = []  # (traits, person id)
        traited: set[int] = set()
        interner, identities = self.interner, self.identities
        strings = interner.strings
        string_id = interner.string_id
        new_person, identify, new_session = identities.new_person, identities.identify, identities.new_session
        inferred_session = identities.inferred_session
        count_person, count_in_session = self.kept.count_person, self.kept.count_in_session
        counted = self.kept.counted.extend  # the rollup changes (write_behind.Kept.count_rollup, unrolled)
        event_id = self.next_event_id
        for index, job in enumerate(jobs):
            project_id = job.project_id
            received = job.received
            agent_id, is_bot = interner.agent(job.user_agent)
            bot = int(is_bot)
            country = job.country
            country_id = None if country is None else (strings.get(country) or string_id(country))
            country_code = country_id or 0
            ip_hash, anonymous_id = anonymous[index]
            persons = identities.persons[project_id]
            sessions = identities.sessions[project_id]
            duplicates: list[int] = []
            for position, ev in enumerate(job.events):
                (uid, ts, name, distinct_id, anon_id, session_key, url, path, referrer, referrer_domain,
                 utm_source, utm_medium, utm_campaign, props, traits, language, screen) = ev
                if uid is None:
                    uid = time_uuid(ts)
                else:
                    key = (project_id, uid)
                    if key in seen:
                        duplicates.append(position)
                        continue
                    seen.add(key)
                distinct_id = distinct_id or anonymous_id
                if anon_id is not None:
                    person_id = identify(project_id, distinct_id, anon_id, ts)
                else:
                    person_id = persons.get(distinct_id) or new_person(project_id, distinct_id, ts)
                if session_key is None or session_key.startswith(INFERRED):
                    session_id = inferred_session(project_id, person_id, ts)
                else:
                    session_id = sessions.get(session_key) or new_session(project_id, session_key, person_id)
                name_id = strings.get(name) or string_id(name)
                path_id = None if path is None else (strings.get(path) or string_id(path))
                referrer_domain_id = None if referrer_domain is None else (
                    strings.get(referrer_domain) or string_id(referrer_domain))
                language_id = None if language is None else (strings.get(language) or string_id(language))
                screen_id = None if screen is None else (strings.get(screen) or string_id(screen))
                rows.append((  # in the order of _INSERT_EVENT's columns
                    event_id, project_id, uid, ts, received, name_id, person_id, session_id,
                    None if url is None else (strings.get(url) or string_id(url)), path_id,
                    None if referrer is None else (strings.get(referrer) or string_id(referrer)),
                    referrer_domain_id, agent_id, ip_hash, props, country_id, language_id, screen_id,
                ))
                event_id += 1

                page_view = name == PAGE_VIEW
                counted((project_id, ts, name_id, bot, person_id, session_id, agent_id,
                         (path_id or 0) if page_view else 0, country_code, language_id or 0, screen_id or 0))
                count_person(person_id, ts)
                if traits is not None:
                    merged.append((traits, person_id))
                    traited.add(project_id)
                count_in_session(session_id, ts, page_view, path_id, referrer_domain_id, utm_source, utm_medium,
                                 utm_campaign, agent_id)
            results.append((job.job_id, len(job.events) - len(duplicates), duplicates))
        self.next_event_id = event_id
        return rows, results, merged, traited

    def _insert_events(self, rows: list[tuple]) -> None:
        conn = self.conn
        before = conn.total_changes()
        conn.executemany(_INSERT_EVENT, rows)
        if conn.total_changes() - before != len(rows):
            raise RuntimeError("an event uuid was stored twice in one batch; the batch is rolled back")

    def _flush(self) -> None:
        """Write every kept rollup change and move derived_through to the last event stored."""
        kept = self.kept
        self.rollups.write(kept.take_counted(), seq=self.next_event_id)  # unique per commit
        kept.derived_through = self.next_event_id - 1
        self.conn.execute(WRITE_DERIVED_THROUGH, (kept.derived_through,))
        kept.since = None

