"""The ClickHouse store: `--store clickhouse://HOST:8123/DB` (one server), `clickhouse://H1:P1,H2:P2/DB?cluster=NAME`
(the shards of a cluster, each named so the schema is made on each; ClickHouse's `remote_servers` names the
same cluster), or `chdb://PATH` (ClickHouse in this process, for tests and one-node trials).

Any number of `pulse serve` processes may share one store. Each gathers the batches that arrive within
COMMIT_WINDOW_S into one commit (`ingest`): one insert of person ids and one of events, through the
Distributed tables in a cluster (split per shard by ClickHouse, confirmed by every shard before it returns);
a batch is answered 202 only after that. The catalog is polled by version (`catalog_changes`), so a key made
or rotated on one node works on every node within a poll.

Every question of the seam is answered, each family in a module of its own: periods (overview, timeseries,
the projects list's summary), breakdowns and bots, goals, lists and properties (users, sessions, events,
property and trait values), journeys (funnel, retention, paths), maintenance (verify, prune, export), with the
filters of `filters`. Where ClickHouse cannot give SQLite's exact number (README, "Scaling out", lists the
cases) it raises NotAvailable, answered 501: never a number computed differently from SQLite's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from pulse.config import Settings
from pulse.enrich import parse_agent
from pulse.protocol import Counts, OverviewStats, PeriodStats, ProjectSummary, Ranked
from pulse.storage.base import Store
from pulse.storage.clickhouse import breakdowns, goals, journeys
from pulse.storage.clickhouse.capabilities import probe
from pulse.storage.clickhouse import lists, live, maintenance, periods, properties
from pulse.storage.clickhouse.filters import conditions
from pulse.storage.clickhouse.ingest import InferredSessions, People, current_sessions, name_rows, trait_rows
from pulse.storage.clickhouse.schema import (
    EVENT_COLUMNS, INFERRED_PREFIX, PERSON_ID_COLUMNS, PERSON_NAME_COLUMNS, PERSON_TRAIT_COLUMNS, create_statements,
)
from pulse.storage.clickhouse.transport import ChdbTransport, HttpTransport, Transport, sql_literal
from pulse.storage.model import (
    DAY_MS, INGEST, PAGE_VIEW, READ, SHARE, Catalog, CommittedEvent, Difference, Filters, Histogram,
    IngestJob, IngestStats, KeyGrant, NotAvailable, Project, ProjectError, ProjectGone, ProjectNotFound, QueueFull,
    Window, WriteFailed, WriterClosed, digest, now_ms,
)
from pulse.storage.sqlite.goals import MAX_GOALS, check_goal, goal_kind
from pulse.storage.sqlite.projects import KEY_PREFIX, checked_changes, new_secret
from pulse.storage.sqlite.rows import (
    ANON_ID, DISTINCT_ID, LANGUAGE, NAME, PATH, PROPS, REFERRER, REFERRER_DOMAIN, SCREEN, SESSION_KEY, TRAITS, TS,
    UID, URL, UTM_CAMPAIGN, UTM_MEDIUM, UTM_SOURCE, prepare, time_uuid,
)
from pulse.storage.sqlite.shares import PREFIX_CHARS, TOKEN_PREFIX

COMMIT_WINDOW_S = 0.02  # how long a commit waits for more batches after the first
LOOKUP_CHUNK = 1000  # values per IN list
QUERY_CHARS = 200_000  # the most text a lookup statement is given (ClickHouse parses at most max_query_size,
# 256 KiB by default, of a query): a commit's lookups that need more are split over several
LIVE_WINDOW_MS = 5 * 60_000
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 10, 100, 1000, 10_000, 100_000)

def _unavailable(question: str) -> NotAvailable:
    return NotAvailable(f"{question} is not available on the ClickHouse store yet")


class ClickHouseStore(Store):
    def __init__(self, settings: Settings, *, serve: bool = True,
                 on_commit: Callable[[list[CommittedEvent]], None] | None = None,
                 wants: Callable[[int], bool] | None = None) -> None:
        self.settings = settings
        self.serve = serve
        self.on_commit = on_commit
        self.wants = wants
        url = urlsplit(settings.store)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.cluster = query.get("cluster") or None
        if url.scheme == "chdb":
            self.chdb_path = unquote(url.netloc + url.path)
            self.db = query.get("database", "pulse")
            self.hosts: list[str] = []
        else:
            self.chdb_path = None
            self.db = url.path.strip("/") or "pulse"
            self.hosts = [f"http://{host}" for host in url.netloc.rpartition("@")[2].split(",") if host]
            self.user = unquote(url.username or "") or None
            self.password = unquote(url.password or "") or None
            if not self.hosts:
                raise ValueError(f"store: no host in {settings.store!r}")
        if not self.db.isidentifier():
            raise ValueError(f"store: the database name must be letters, digits and _, not {self.db!r}")
        self.transports: list[Transport] = []
        self.pending: list[tuple[IngestJob, asyncio.Future]] = []
        self.pending_events = 0
        self.wake: asyncio.Event | None = None
        self.committer: asyncio.Task | None = None
        self.recording: asyncio.Task | None = None  # the last commit's rows for the live feed, being written
        self.closing = False
        self.salts: dict[int, bytes] = {}
        self._last_version = 0
        self.stats = {"commits": 0, "events_written": 0, "duplicates": 0, "failures": 0,
                      "last_commit_at": None, "last_batch_events": 0, "last_commit_seconds": 0.0}
        self.commit_counts = [0] * (len(COMMIT_BUCKETS) + 1)
        self.commit_sum = 0.0
        self.batch_counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0.0
        self.oldest_waiting: float | None = None
        self.live = live.LivePoller(self)

    # -- life cycle -----------------------------------------------------------------------------------

    @property
    def ch(self) -> Transport:
        """The node questions and inserts go to (the first named)."""
        return self.transports[0]

    def t(self, table: str) -> str:
        """A table as questions and inserts name it: its Distributed table in a cluster."""
        return f"{self.db}.{table}_all" if self.cluster else f"{self.db}.{table}"

    @property
    def insert_settings(self) -> dict[str, str]:
        return {"insert_distributed_sync": "1"} if self.cluster else {}

    async def __aenter__(self) -> ClickHouseStore:
        if self.chdb_path is not None:
            self.transports = [ChdbTransport(self.chdb_path)]
        else:
            self.transports = [HttpTransport(host, user=self.user, password=self.password,
                                             timeout_s=max(self.settings.query_timeout_s, 30.0))
                               for host in self.hosts]
        try:
            self.capabilities = await probe(self.ch)
            if self.cluster is not None:
                shards = await self.ch.select(
                    f"SELECT count(DISTINCT shard_num) FROM system.clusters WHERE cluster = {sql_literal(self.cluster)}")
                if shards[0][0] == 0:
                    raise ValueError(f"store: ClickHouse has no cluster {self.cluster!r} in its remote_servers")
            for transport in self.transports:  # no ON CLUSTER without ZooKeeper: the DDL runs on each shard
                for statement in create_statements(self.db, self.cluster):
                    await transport.execute(statement)
            await periods.backfill(self)
        except BaseException:
            await self._close_transports()
            raise
        if self.serve:
            self.wake = asyncio.Event()
            self.committer = asyncio.create_task(self._commit_loop(), name="pulse-clickhouse-commits")
            if self.on_commit is not None and self.chdb_path is None:  # chdb's store is this process's alone
                self.live.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closing = True
        await self.live.stop()
        if self.committer is not None:
            self.wake.set()
            await self.committer
        if self.recording is not None:
            await self.recording
        await self._close_transports()

    async def _close_transports(self) -> None:
        for transport in self.transports:
            await transport.close()

    def stop_reads(self) -> None:
        """Questions run as HTTP requests the server cancels with their handlers; nothing else holds them."""

    # -- ingest: group commit -------------------------------------------------------------------------

    def enqueue(self, job: IngestJob) -> asyncio.Future[tuple[int, int]]:
        if self.closing or self.committer is None:
            raise WriterClosed("the store is closing")
        if self.pending_events + len(job.events) > self.settings.queue_max_events:
            raise QueueFull(1)
        future = asyncio.get_running_loop().create_future()
        self.pending.append((job, future))
        self.pending_events += len(job.events)
        if self.oldest_waiting is None:
            self.oldest_waiting = time.monotonic()
        self.wake.set()
        return future

    async def _commit_loop(self) -> None:
        """One commit at a time: each sees every earlier commit's rows (persons, sessions, uuids)."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self.pending:
                if self.closing:
                    return
                continue
            if not self.closing:
                await asyncio.sleep(COMMIT_WINDOW_S)
            taken, self.pending = self.pending, []
            self.pending_events = 0
            self.oldest_waiting = None
            started = time.monotonic()
            try:
                results, committed = await self._commit([job for job, _ in taken])
            except Exception as exc:  # nothing of a failed commit is acknowledged; its batches are retried
                self.stats["failures"] += 1
                for _, future in taken:
                    if not future.done():
                        future.set_exception(WriteFailed(f"ClickHouse insert failed: {exc}"))
                continue
            for (_, future), result in zip(taken, results):
                if future.done():
                    continue
                if result is None:
                    future.set_exception(ProjectGone("the project was deleted"))
                else:
                    future.set_result(result)
            self._count(time.monotonic() - started, sum(r[0] for r in results if r), sum(r[1] for r in results if r))
            if committed and self.on_commit is not None:
                self.on_commit(committed)

    def _count(self, seconds: float, events: int, duplicates: int) -> None:
        stats = self.stats
        stats["commits"] += 1
        stats["events_written"] += events
        stats["duplicates"] += duplicates
        stats["last_commit_at"] = time.time()
        stats["last_batch_events"] = events
        stats["last_commit_seconds"] = seconds
        self.commit_counts[_bucket(COMMIT_BUCKETS, seconds)] += 1
        self.commit_sum += seconds
        self.batch_counts[_bucket(BATCH_BUCKETS, events)] += 1
        self.batch_sum += events

    async def _commit(self, jobs: list[IngestJob]) -> tuple[list[tuple[int, int] | None], list[CommittedEvent]]:
        prepared = [prepare(job) for job in jobs]
        anonymous = [await self._anonymous(job) for job in jobs]
        wanted_ids: dict[int, set[str]] = {}
        wanted_uids: dict[int, set[bytes]] = {}
        keyless_ids: dict[int, set[str]] = {}  # the ids of events that join an inferred session
        for i, job in enumerate(jobs):
            ids = wanted_ids.setdefault(job.project_id, set())
            uids = wanted_uids.setdefault(job.project_id, set())
            keyless = keyless_ids.setdefault(job.project_id, set())
            for ev in prepared[i]:
                distinct_id = ev[DISTINCT_ID] or anonymous[i][1]
                ids.add(distinct_id)
                if ev[ANON_ID] is not None:
                    ids.add(ev[ANON_ID])
                if ev[UID] is not None:
                    uids.add(ev[UID])
                key = ev[SESSION_KEY]
                if key is None or key.startswith(INFERRED_PREFIX):
                    keyless.add(distinct_id)
                    if ev[ANON_ID] is not None:
                        keyless.add(ev[ANON_ID])
        live, stored, persons = await self._lookup(wanted_ids, wanted_uids)
        by_project: dict[int, list[int]] = {}
        for index, job in enumerate(jobs):
            if job.project_id in live:
                by_project.setdefault(job.project_id, []).append(index)
        results: list[tuple[int, int] | None] = [None] * len(jobs)
        event_rows: list[tuple] = []
        person_rows: list[tuple] = []
        traits: list[tuple[int, str, str]] = []
        names: list[tuple[int, str, str]] = []
        agents: list[str] = []  # each event row's user agent, for the other nodes' live feeds
        committed: list[CommittedEvent] = []
        version = time.time_ns()
        for project_id, indexes in by_project.items():
            seen = stored.get(project_id, set())
            people = People(persons.get(project_id, {}))
            # persons first seen in this commit have no stored sessions: only known ones are looked up
            inferred = {people.known[i] for i in keyless_ids[project_id] if i in people.known}
            sessions = InferredSessions(await self._inferred(project_id, inferred))
            wanted = self.on_commit is not None and (self.wants is None or self.wants(project_id))
            for i in indexes:
                job = jobs[i]
                agent = parse_agent(job.user_agent)
                ip_hash, anonymous_id = anonymous[i]
                duplicates = 0
                for ev in prepared[i]:
                    uid = ev[UID]
                    if uid is None:
                        uid = time_uuid(ev[TS])
                    elif uid in seen:
                        duplicates += 1
                        continue
                    else:
                        seen.add(uid)
                    distinct_id = ev[DISTINCT_ID] or anonymous_id
                    if ev[ANON_ID] is not None:
                        person = people.identify(distinct_id, ev[ANON_ID])
                    else:
                        person = people.person(distinct_id)
                    key = ev[SESSION_KEY]
                    if key is None or key.startswith(INFERRED_PREFIX):
                        session = sessions.session(person, ev[TS])
                    else:
                        session = key
                    name = ev[NAME]
                    event_rows.append((
                        project_id, ev[TS], job.received_ms, uid, name, distinct_id, person, session,
                        ev[URL] or "", ev[PATH] or "", ev[REFERRER] or "", ev[REFERRER_DOMAIN] or "",
                        ev[UTM_SOURCE] or "", ev[UTM_MEDIUM] or "", ev[UTM_CAMPAIGN] or "", ev[PROPS] or "",
                        ev[TRAITS] or "", job.country or "", ev[LANGUAGE] or "", ev[SCREEN] or "", agent.browser,
                        agent.os, agent.device, int(agent.is_bot), ip_hash, int(name == PAGE_VIEW),
                    ))
                    if ev[TRAITS]:
                        traits.append((project_id, person, ev[TRAITS]))
                    agents.append(job.user_agent)
                    if wanted:
                        committed.append(CommittedEvent(project_id, ev[TS], name, distinct_id, ev[PATH], ev[PROPS],
                                                        job.user_agent))
                results[i] = (len(job.events) - duplicates, duplicates)
            person_rows += [(project_id, distinct_id, person, version) for distinct_id, person in people.new]
            names += [(project_id, person, distinct_id) for person, distinct_id in people.renamed]
        # person ids first: a commit that fails after them leaves links its retry finds again, never events
        # whose persons were not recorded
        await self.ch.insert(self.t("person_ids"), [c for c, _ in PERSON_ID_COLUMNS],
                             [k for _, k in PERSON_ID_COLUMNS], person_rows, self.insert_settings)
        await self.ch.insert(self.t("person_traits"), [c for c, _ in PERSON_TRAIT_COLUMNS],
                             [k for _, k in PERSON_TRAIT_COLUMNS], trait_rows(traits), self.insert_settings)
        await self.ch.insert(self.t("person_names"), [c for c, _ in PERSON_NAME_COLUMNS],
                             [k for _, k in PERSON_NAME_COLUMNS], name_rows(names), self.insert_settings)
        await self.ch.insert(self.t("events"), [c for c, _ in EVENT_COLUMNS], [k for _, k in EVENT_COLUMNS],
                             event_rows, self.insert_settings)
        if self.recording is not None:  # one commit's feed rows in flight at a time
            await self.recording
        # the feed's rows are written while the batches are answered and the next commit gathers: a failure
        # there is logged and never fails the commit (see `live`)
        self.recording = asyncio.create_task(self.live.record(event_rows, agents, version // 1_000_000),
                                             name="pulse-clickhouse-live-rows")
        return results, committed

    async def _lookup(self, ids: dict[int, set[str]], uids: dict[int, set[bytes]]
                      ) -> tuple[set[int], dict[int, set[bytes]], dict[int, dict[str, str]]]:
        """What a commit reads before it decides, in as few statements as the query size allows (one, for a
        commit of a few thousand events): which of its projects exist now (a batch for a project deleted
        while it waited is refused), which of its client uuids are stored already, and the person of each of
        its distinct ids. Every part answers (kind, project, text, text)."""
        projects = ", ".join(map(str, ids))
        parts = [f"SELECT toUInt8(0) AS kind, id AS project, '' AS a, '' AS b FROM {self.t('projects')}"
                 f" WHERE id IN ({projects}) GROUP BY id HAVING argMax(deleted, version) = 0"]
        for project_id, values in uids.items():
            listed = list(values)
            for start in range(0, len(listed), LOOKUP_CHUNK):
                chunk = ", ".join(map(sql_literal, listed[start:start + LOOKUP_CHUNK]))
                parts.append(f"SELECT toUInt8(1), project_id, hex(uuid), '' FROM {self.t('event_ids')}"
                             f" WHERE project_id = {project_id} AND uuid IN ({chunk})")
        for project_id, values in ids.items():
            listed = list(values)
            for start in range(0, len(listed), LOOKUP_CHUNK):
                chunk = ", ".join(map(sql_literal, listed[start:start + LOOKUP_CHUNK]))
                parts.append(f"SELECT toUInt8(2), project_id, distinct_id, argMax(person, version)"
                             f" FROM {self.t('person_ids')} WHERE project_id = {project_id} AND distinct_id IN ({chunk})"
                             " GROUP BY project_id, distinct_id")
        live: set[int] = set()
        stored: dict[int, set[bytes]] = {}
        persons: dict[int, dict[str, str]] = {}
        for statement in _union(parts):
            for kind, project_id, a, b in await self.ch.select(statement):
                if kind == 0:
                    live.add(project_id)
                elif kind == 1:
                    stored.setdefault(project_id, set()).add(bytes.fromhex(a))
                else:
                    persons.setdefault(project_id, {})[a] = b
        return live, stored, persons

    async def _anonymous(self, job: IngestJob) -> tuple[bytes, str]:
        """The request's ip hash and anonymous distinct id, with the day's salt (shared by every node)."""
        salt = await self._salt(job.received_ms // DAY_MS)
        ip_hash = hashlib.sha256(b"%s%d\x00%s\x00%s" % (salt, job.project_id, job.ip.encode(),
                                                        job.user_agent.encode())).digest()[:8]
        return ip_hash, "$ip:" + ip_hash.hex()

    async def _salt(self, day: int) -> bytes:
        """The day's salt: the first one written for the day (nodes that made one at once agree on the
        earliest); earlier days' are deleted when a day's is made, so yesterday's visitors cannot be linked."""
        found = self.salts.get(day)
        if found is not None:
            return found
        query = f"SELECT hex(salt) FROM {self.t('salts')} WHERE day = {day} ORDER BY created, salt LIMIT 1"
        rows = await self.ch.select(query)
        if not rows:
            await self.ch.insert(self.t("salts"), ["day", "salt", "created"], ["UInt32", "FixedString(16)", "Int64"],
                                 [(day, os.urandom(16), time.time_ns())], self.insert_settings)
            rows = await self.ch.select(query)
            for transport in self.transports:
                await transport.execute(f"ALTER TABLE {self.db}.salts DELETE WHERE day < {day - 1}")
        self.salts = {day: bytes.fromhex(rows[0][0])}
        return self.salts[day]

    async def _inferred(self, project_id: int, persons: set[str]) -> dict[str, list]:
        rows: list[tuple] = []
        values = list(persons)
        for start in range(0, len(values), LOOKUP_CHUNK):
            chunk = ", ".join(sql_literal(v) for v in values[start:start + LOOKUP_CHUNK])
            rows += await self.ch.select(
                f"SELECT person, session, minMerge(first), maxMerge(last) FROM {self.t('person_sessions')}"
                f" WHERE project_id = {project_id} AND person IN ({chunk}) GROUP BY person, session")
        return current_sessions(rows)

    def ingest_stats(self) -> IngestStats:
        stats = self.stats
        lag = 0.0 if self.oldest_waiting is None else time.monotonic() - self.oldest_waiting
        return IngestStats(
            state="stopping" if self.closing else "ok", queued_events=self.pending_events, lag_seconds=lag,
            commits=stats["commits"], events_written=stats["events_written"], duplicates=stats["duplicates"],
            failures=stats["failures"], restarts=0, stalled_requests=0, last_commit_at=stats["last_commit_at"],
            last_batch_events=stats["last_batch_events"], last_commit_seconds=stats["last_commit_seconds"],
            commit_seconds=Histogram(COMMIT_BUCKETS, list(self.commit_counts), self.commit_sum),
            batch_events=Histogram(BATCH_BUCKETS, list(self.batch_counts), self.batch_sum),
        )

    # -- the catalog ----------------------------------------------------------------------------------

    def _version(self) -> int:
        """A version above every earlier one this process wrote (nanoseconds: above other nodes' older ones)."""
        self._last_version = max(self._last_version + 1, time.time_ns())
        return self._last_version

    async def _bump(self) -> None:
        await self.ch.insert(self.t("catalog_changes"), ["version"], ["UInt64"], [(self._version(),)],
                             self.insert_settings)

    async def catalog_version(self) -> int:
        return (await self.ch.select(f"SELECT max(version) FROM {self.t('catalog_changes')}"))[0][0]

    async def catalog(self) -> Catalog:
        version = await self.catalog_version()
        grants = {key: KeyGrant(project_id, kind, expires or None) for key, project_id, kind, _, _, expires
                  in await self._keys()}
        for key, _, project_id, _, _, expires in await self._shares():
            grants[key] = KeyGrant(project_id, SHARE, expires or None)
        return Catalog(version, grants, {p.id: p for p in await self.list_projects()})

    async def _keys(self, project_id: int | None = None) -> list[tuple]:
        """(digest, project, kind, prefix, created, expires or 0) of every live key."""
        return await self._live_digests("keys", ("project_id", "kind", "prefix", "created_at", "expires_at"),
                                        project_id)

    async def _shares(self, project_id: int | None = None) -> list[tuple]:
        """(digest, id, project, prefix, created, expires or 0) of every live share token."""
        return await self._live_digests("shares", ("id", "project_id", "prefix", "created_at", "expires_at"),
                                        project_id)

    async def _live_digests(self, table: str, columns: tuple[str, ...], project_id: int | None) -> list[tuple]:
        """(digest, *columns) of the latest version of every row of a catalog table keyed by digest, but those
        whose latest version deletes them."""
        where = "" if project_id is None else f" WHERE project_id = {project_id}"
        latest = ", ".join(f"argMax({column}, version)" for column in columns)
        rows = await self.ch.select(f"SELECT hex(digest), {latest}, argMax(deleted, version) AS gone"
                                    f" FROM {self.t(table)}{where} GROUP BY digest HAVING gone = 0")
        return [(bytes.fromhex(row[0]), *row[1:-1]) for row in rows]

    async def list_projects(self) -> list[Project]:
        rows = await self.ch.select(
            "SELECT id, argMax(name, version), argMax(domain, version), argMax(timezone, version),"
            " argMax(retention_days, version), argMax(created_at, version), argMax(allowed_origins, version),"
            " argMax(site_id, version), argMax(deleted, version) AS gone"
            f" FROM {self.t('projects')} GROUP BY id HAVING gone = 0 ORDER BY id")
        return [Project(id_, name, domain or None, tz, retention, created, origins or None, site or None)
                for id_, name, domain, tz, retention, created, origins, site, _ in rows]

    async def get_project(self, ref: str | int) -> Project:
        for project in await self.list_projects():
            if (isinstance(ref, int) or str(ref).isdigit()) and project.id == int(ref) or project.name == ref:
                return project
        raise ProjectNotFound(f"no project {ref!r}")

    async def _write_project(self, project: Project, *, deleted: bool = False) -> None:
        await self.ch.insert(
            self.t("projects"),
            ["id", "name", "domain", "timezone", "retention_days", "created_at", "allowed_origins", "site_id",
             "deleted", "version"],
            ["UInt32", "String", "String", "String", "UInt32", "Int64", "String", "String", "UInt8", "UInt64"],
            [(project.id, project.name, project.domain or "", project.timezone, project.retention_days,
              project.created_at, project.allowed_origins or "", project.site_id or "", int(deleted),
              self._version())], self.insert_settings)

    async def _write_keys(self, rows: list[tuple]) -> None:
        """(digest, project, kind, prefix, created, expires or 0, deleted) rows."""
        await self.ch.insert(
            self.t("keys"), ["digest", "project_id", "kind", "prefix", "created_at", "expires_at", "deleted", "version"],
            ["FixedString(32)", "UInt32", "String", "String", "Int64", "Int64", "UInt8", "UInt64"],
            [(*row, self._version()) for row in rows], self.insert_settings)

    async def _new_key(self, project_id: int, kind: str) -> str:
        secret = new_secret(kind)
        await self._write_keys([(digest(secret), project_id, kind, secret[:7], now_ms(), 0, 0)])
        return secret

    async def create_project(self, name: str, *, domain: str | None = None, timezone: str = "UTC",
                             retention_days: int = 180, allowed_origins: str | None = None
                             ) -> tuple[Project, str, str]:
        checked = checked_changes(name=name, domain=domain, timezone=timezone, retention_days=retention_days,
                                  allowed_origins=allowed_origins)
        domain, allowed_origins = checked.get("domain"), checked.get("allowed_origins")
        if any(p.name == name for p in await self.list_projects()):
            raise ProjectError(f"a project named {name!r} already exists")
        # ids are never reused (deleted projects' rows stay, flagged), so nothing cached of one is taken for another
        project_id = (await self.ch.select(f"SELECT max(id) FROM {self.t('projects')}"))[0][0] + 1
        project = Project(project_id, name, domain, timezone, retention_days, now_ms(), allowed_origins,
                          str(uuid.uuid4()))
        await self._write_project(project)
        ingest_key = await self._new_key(project_id, INGEST)
        read_token = await self._new_key(project_id, READ)
        await self._bump()
        return project, ingest_key, read_token

    async def update_project(self, project: Project, *, name: str | None = None, domain: str | None = None,
                             timezone: str | None = None, retention_days: int | None = None,
                             allowed_origins: str | None = None) -> Project:
        current = await self.get_project(project.id)
        changes = checked_changes(name=name, domain=domain, timezone=timezone, retention_days=retention_days,
                                  allowed_origins=allowed_origins)
        if name is not None and any(p.name == name and p.id != project.id for p in await self.list_projects()):
            raise ProjectError(f"a project named {name!r} already exists")
        if changes:
            fields = {**current.as_dict(), **changes}
            current = Project(**fields)
            await self._write_project(current)
            await self._bump()
        return current

    async def delete_project(self, project: Project) -> None:
        await self._write_project(project, deleted=True)
        await self._write_keys([(*row[:6], 1) for row in await self._keys(project.id)])
        await self._bump()
        for transport in self.transports:  # the data, by mutations on each shard (ClickHouse runs them behind)
            for table in ("events", "event_ids", "hourly", "sessions", "person_sessions", "person_ids"):
                await transport.execute(f"ALTER TABLE {self.db}.{table} DELETE WHERE project_id = {project.id}")

    async def rotate_key(self, project: Project, kind: str, *, grace_seconds: int = 0) -> str:
        if kind not in KEY_PREFIX:
            raise ProjectError(f"unknown key kind {kind!r}")
        if grace_seconds < 0:
            raise ProjectError("grace period cannot be negative")
        now = now_ms()
        expires = now + grace_seconds * 1000
        changed = []
        for key, project_id, key_kind, prefix, created, old_expiry in await self._keys(project.id):
            if key_kind != kind:
                continue
            if grace_seconds == 0 or (old_expiry and old_expiry <= now):
                changed.append((key, project_id, key_kind, prefix, created, old_expiry, 1))
            else:
                changed.append((key, project_id, key_kind, prefix, created, min(old_expiry or expires, expires), 0))
        await self._write_keys(changed)
        secret = await self._new_key(project.id, kind)
        await self._bump()
        return secret

    async def list_keys(self, project: Project) -> list[dict[str, Any]]:
        now = now_ms()
        rows = sorted(await self._keys(project.id), key=lambda row: (row[2], row[4]))
        return [{"kind": kind, "prefix": prefix + "…", "created_at": created, "expires_at": expires or None,
                 "active": not expires or expires > now} for _, _, kind, prefix, created, expires in rows]

    async def _goals(self, project_id: int) -> list[tuple[str, int]]:
        return await self.ch.select(
            "SELECT goal, argMax(created_at, version), argMax(deleted, version) AS gone"
            f" FROM {self.t('goals')} WHERE project_id = {project_id} GROUP BY goal HAVING gone = 0 ORDER BY goal")

    async def _write_goal(self, project_id: int, goal: str, created: int, deleted: bool) -> None:
        await self.ch.insert(self.t("goals"), ["project_id", "goal", "created_at", "deleted", "version"],
                             ["UInt32", "String", "Int64", "UInt8", "UInt64"],
                             [(project_id, goal, created, int(deleted), self._version())], self.insert_settings)

    async def list_goals(self, project: Project) -> list[dict[str, Any]]:
        return [{"goal": goal, "kind": goal_kind(goal), "created_at": created}
                for goal, created, _ in await self._goals(project.id)]

    async def add_goal(self, project: Project, goal: str) -> dict[str, Any]:
        goal = check_goal(goal)
        existing = await self._goals(project.id)
        if any(found == goal for found, _, _ in existing):
            raise ProjectError(f"project {project.name} already has the goal {goal!r}")
        if len(existing) >= MAX_GOALS:
            raise ProjectError(f"project {project.name} has {MAX_GOALS} goals, the most it may have")
        created = now_ms()
        await self._write_goal(project.id, goal, created, False)
        return {"goal": goal, "kind": goal_kind(goal), "created_at": created}

    async def remove_goal(self, project: Project, goal: str) -> None:
        if not any(found == goal for found, _, _ in await self._goals(project.id)):
            raise ProjectError(f"project {project.name} has no goal {goal!r}")
        await self._write_goal(project.id, goal, 0, True)

    @staticmethod
    def _share_row(share_id: int, prefix: str, created: int, expires: int, now: int) -> dict[str, Any]:
        return {"id": share_id, "prefix": prefix + "…", "created_at": created, "expires_at": expires or None,
                "active": not expires or expires > now}

    async def _write_share(self, key: bytes, share_id: int, project_id: int, prefix: str, created: int,
                           expires: int, deleted: bool) -> None:
        await self.ch.insert(
            self.t("shares"), ["digest", "id", "project_id", "prefix", "created_at", "expires_at", "deleted", "version"],
            ["FixedString(32)", "UInt64", "UInt32", "String", "Int64", "Int64", "UInt8", "UInt64"],
            [(key, share_id, project_id, prefix, created, expires, int(deleted), self._version())],
            self.insert_settings)

    async def create_share(self, project: Project, *, expires_in_s: int | None = None) -> tuple[dict[str, Any], str]:
        if expires_in_s is not None and expires_in_s <= 0:
            raise ProjectError("a share link's lifetime must be positive")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(24)
        created = now_ms()
        expires = 0 if expires_in_s is None else created + expires_in_s * 1000
        share_id = (await self.ch.select(f"SELECT max(id) FROM {self.t('shares')}"))[0][0] + 1
        await self._write_share(digest(secret), share_id, project.id, secret[:PREFIX_CHARS], created, expires, False)
        await self._bump()
        return self._share_row(share_id, secret[:PREFIX_CHARS], created, expires, created), secret

    async def list_shares(self, project: Project) -> list[dict[str, Any]]:
        now = now_ms()
        return [self._share_row(share_id, prefix, created, expires, now)
                for _, share_id, _, prefix, created, expires in sorted(await self._shares(project.id),
                                                                         key=lambda row: row[1])]

    async def revoke_share(self, project: Project, ref: str) -> dict[str, Any]:
        ref = ref.strip().rstrip("…")
        shares = await self._shares(project.id)
        if ref.isdigit():
            found = [row for row in shares if row[1] == int(ref)]
        elif len(ref) > PREFIX_CHARS:
            found = [row for row in shares if row[0] == digest(ref)]
        else:
            found = [row for row in shares if row[3] == ref]
        if not found:
            raise ProjectError(f"project {project.name} has no share link {ref!r} (see pulse share list)")
        if len(found) > 1:
            raise ProjectError(f"{ref!r} names {len(found)} share links of project {project.name}; give the id")
        key, share_id, project_id, prefix, created, expires = found[0]
        await self._write_share(key, share_id, project_id, prefix, created, expires, True)
        await self._bump()
        return self._share_row(share_id, prefix, created, expires, now_ms())

    # -- the read questions ----------------------------------------------------------------------------

    def _conditions(self, project_id: int, filters: Filters) -> str:
        """WHERE terms over `events` for the project, no bots, and the filters (`filters.conditions`)."""
        return conditions(self, project_id, filters)

    async def _totals(self, project_id: int, window: Window, filters: Filters, by: str | None,
                      hour_key: str | None = None, covered: tuple[int, int] | None = None,
                      raw: list[tuple[int, int]] | None = None) -> list[tuple]:
        """Rows of (key, events, users, sessions) grouped by `by` (an expression over events: `name`, a bucket;
        None: one row), whole hours from the rollups when only the event name is filtered, the rest from raw
        events. `hour_key` is `by` over the rollup's `hour`, for a key other than the name."""
        where = self._conditions(project_id, filters)
        if covered is None and raw is None:
            hours, raw = window.split() if filters.rollup_ready else (None, [(window.start, window.end)])
            covered = hours
        parts = []
        key = by or "0"
        if covered is not None and covered[0] < covered[1]:
            name = "" if filters.event is None else f" AND name = {sql_literal(filters.event)}"
            parts.append(
                f"SELECT {hour_key or key} AS k, countMerge(events) AS e, uniqExactMergeState(users) AS u,"
                f" uniqExactMergeState(sessions) AS s FROM {self.t('hourly')} WHERE project_id = {project_id}"
                f" AND bot = 0 AND hour >= {covered[0]} AND hour < {covered[1]}{name} GROUP BY k")
        if raw:
            spans = " OR ".join(f"(ts >= {start} AND ts < {end})" for start, end in raw)
            parts.append(f"SELECT {key} AS k, count() AS e, uniqExactState(person) AS u, uniqExactState(session) AS s"
                         f" FROM {self.t('events')} WHERE {where} AND ({spans}) GROUP BY k")
        if not parts:
            return []
        union = " UNION ALL ".join(parts)
        return await self.ch.select(
            f"SELECT k, sum(e), uniqExactMerge(u), uniqExactMerge(s) FROM ({union}) GROUP BY k ORDER BY k")

    async def _session_sums(self, project_id: int, window: Window, filters: Filters) -> tuple[int, int, int, int]:
        return await periods.session_sums(self, project_id, window, filters)

    async def overview(self, project_id: int, window: Window, filters: Filters, now_ms: int) -> OverviewStats:
        current, live, previous = await asyncio.gather(
            periods.period(self, project_id, window, filters),
            periods.counts(self, project_id, [now_ms - LIVE_WINDOW_MS, now_ms + 1], filters),
            periods.period(self, project_id, window.previous, filters))
        return OverviewStats(**{f: getattr(current, f) for f in PeriodStats.__struct_fields__},
                             live_visitors=live[0].unique_users, previous=previous)

    async def timeseries(self, project_id: int, bounds: list[int], filters: Filters) -> list[Counts]:
        return await periods.counts(self, project_id, bounds, filters)

    async def top_events(self, project_id: int, window: Window, filters: Filters, limit: int) -> list[Ranked]:
        rows = [Ranked(name, events, users) for name, events, users, _ in
                await self._totals(project_id, window, filters, "name")]
        rows.sort(key=lambda r: (-r.count, r.value))
        return rows[:limit]

    async def project_summary(self, project_id: int, today: Window, hour_bounds: list[int]) -> ProjectSummary:
        totals = await periods.counts(self, project_id, [today.start, today.end], Filters())
        return ProjectSummary(totals[0].events,
                              [c.events for c in await self.timeseries(project_id, hour_bounds, Filters())])

    async def events_since(self, project_id: int, start_ms: int) -> int:
        return (await self.ch.select(
            f"SELECT count() FROM {self.t('events')} WHERE project_id = {project_id} AND ts >= {start_ms}"))[0][0]

    async def size_bytes(self) -> int:
        total = 0
        for transport in self.transports:
            total += (await transport.select(
                f"SELECT sum(bytes_on_disk) FROM system.parts WHERE database = {sql_literal(self.db)} AND active"))[0][0]
        return total

    # -- not built yet --------------------------------------------------------------------------------

    async def breakdown(self, *args: Any) -> Any:
        return await breakdowns.breakdown(self, *args)

    async def sessions(self, *args: Any) -> Any:
        return await lists.sessions(self, *args)

    async def users(self, *args: Any) -> Any:
        return await lists.users(self, *args)

    async def events(self, *args: Any) -> Any:
        return await lists.events(self, *args)

    async def user_timeline(self, *args: Any) -> Any:
        return await lists.user_timeline(self, *args)

    async def property_keys(self, *args: Any) -> Any:
        return await properties.property_keys(self, *args)

    async def property_values(self, *args: Any) -> Any:
        return await properties.property_values(self, *args)

    async def trait_keys(self, *args: Any) -> Any:
        return await properties.trait_keys(self, *args)

    async def trait_values(self, *args: Any) -> Any:
        return await properties.trait_values(self, *args)

    async def goals(self, *args: Any) -> Any:
        return await goals.goals(self, *args)

    async def bots(self, *args: Any) -> Any:
        return await breakdowns.bots(self, *args)

    async def funnel(self, *args: Any) -> Any:
        return await journeys.funnel(self, *args)

    async def retention(self, *args: Any) -> Any:
        return await journeys.retention(self, *args)

    async def paths(self, *args: Any) -> Any:
        return await journeys.paths(self, *args)

    async def verify(self, chosen: list[Project] | None = None) -> list[Difference]:
        return await maintenance.verify(self, chosen)

    async def prune(self, now_ms: int) -> dict[str, int]:
        return await maintenance.prune(self, now_ms)

    async def backup(self, destination: Path) -> tuple[Path, int]:
        raise maintenance.backup()

    async def export(self, project_id: int, start_ms: int, end_ms: int, fmt: str, out: TextIO) -> int:
        return await maintenance.export(self, project_id, start_ms, end_ms, fmt, out)


def _union(parts: list[str]) -> list[str]:
    """The parts as few UNION ALL statements as keep each within QUERY_CHARS."""
    statements: list[list[str]] = []
    size = QUERY_CHARS
    for part in parts:
        if size + len(part) > QUERY_CHARS:
            statements.append([])
            size = 0
        statements[-1].append(part)
        size += len(part) + len(" UNION ALL ")
    return [" UNION ALL ".join(group) for group in statements]


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    for index, bound in enumerate(bounds):
        if value <= bound:
            return index
    return len(bounds)
