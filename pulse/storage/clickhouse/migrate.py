"""`pulse migrate --to clickhouse://…`: a SQLite database copied into the ClickHouse store.

What is copied: every project with its id, settings and site id, its keys and share links by digest (their
secrets keep working), its goals, every distinct id with its person (identify links included), and every raw
event with its person and session, in batches of `batch` rows (RowBinary). The ClickHouse store's rollups and
sessions follow from the events (its materialized views), so nothing aggregated is copied, and the day's salt
of anonymous visitors' ids, so a visitor seen today keeps their id.

How SQLite's rows become ClickHouse's: a person is named by its SQLite distinct id (the id SQLite shows it by)
and every event carries that id (SQLite keeps an event's person, not the id it was sent with); a session is
its key (inferred ones keep their `$auto:` key, so ingest goes on adding to them); an event's UTM values are
its session's (SQLite keeps them per session); a person's merged traits go on their last event.

Re-running is safe and resumes: a project already in the target under the same id and name is not written
again (its keys and goals may have changed there since), distinct ids and events (by uuid) already there are
skipped. A target that holds any other project, or a project of the same id under another name, is refused
before anything is written. The SQLite database is read in one read transaction, so a server may keep
running on it: what it stores meanwhile is copied by the next run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pulse.storage.clickhouse.schema import EVENT_COLUMNS, PERSON_ID_COLUMNS
from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import PAGE_VIEW, Project, ProjectError
from pulse.storage.sqlite.connection import connect

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

BATCH_EVENTS = 10_000
LOOKUP_CHUNK = 1000  # values per IN list of a lookup
IP_HASH_BYTES = 8

_EVENTS = (
    "SELECT e.id, e.uuid, e.ts, e.received, n.value, p.distinct_id, s.session_key, u.value, pa.value, r.value,"
    " rd.value, us.value, um.value, uc.value, e.props, e.person_id, c.value, l.value, sc.value, a.browser, a.os,"
    " a.device, a.is_bot, e.ip_hash"
    " FROM events e JOIN strings n ON n.id = e.name_id JOIN persons p ON p.id = e.person_id"
    " LEFT JOIN sessions s ON s.id = e.session_id LEFT JOIN strings u ON u.id = e.url_id"
    " LEFT JOIN strings pa ON pa.id = e.path_id LEFT JOIN strings r ON r.id = e.referrer_id"
    " LEFT JOIN strings rd ON rd.id = e.referrer_domain_id LEFT JOIN strings us ON us.id = s.utm_source_id"
    " LEFT JOIN strings um ON um.id = s.utm_medium_id LEFT JOIN strings uc ON uc.id = s.utm_campaign_id"
    " LEFT JOIN strings c ON c.id = e.country_id LEFT JOIN strings l ON l.id = e.language_id"
    " LEFT JOIN strings sc ON sc.id = e.screen_id LEFT JOIN agents a ON a.id = e.agent_id"
    " WHERE e.project_id = ? AND e.id > ? ORDER BY e.id LIMIT ?"
)


@dataclass
class Copied:
    """One project's rows: how many the SQLite database holds and how many this run wrote."""

    project: Project
    events: int = 0
    persons: int = 0
    sessions: int = 0
    events_written: int = 0
    ids_written: int = 0
    catalog_written: bool = False
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # what: (SQLite, ClickHouse)


async def _present(store: ClickHouseStore, table: str, column: str, project_id: int, values: list) -> set:
    found: set = set()
    for start in range(0, len(values), LOOKUP_CHUNK):
        chunk = ", ".join(sql_literal(v) for v in values[start:start + LOOKUP_CHUNK])
        shown = f"hex({column})" if column == "uuid" else column
        found.update(value for (value,) in await store.ch.select(
            f"SELECT {shown} FROM {store.t(table)} WHERE project_id = {project_id} AND {column} IN ({chunk})"))
    return found


async def _target_projects(store: ClickHouseStore, projects: list[Project]) -> set[int]:
    """The source's projects the target holds already (an earlier run's); refuses any other project there."""
    there = {p.id: p for p in await store.list_projects()}
    mine = {p.id: p for p in projects}
    for pid, project in there.items():
        if pid not in mine or mine[pid].name != project.name:
            raise ProjectError(
                f"the ClickHouse store already holds project {project.name!r} (id {pid}), which is not this"
                " database's: migrate copies into an empty store, or resumes its own earlier copy")
    return set(there)


async def _catalog(store: ClickHouseStore, conn, project: Project) -> None:
    """Keys, share links and goals, then the project row: a run stopped in between writes them all again."""
    pid = project.id
    keys = [(bytes(digest), pid, kind, prefix, created, expires or 0, 0) for digest, kind, prefix, created, expires
            in conn.execute("SELECT digest, kind, prefix, created_at, expires_at FROM keys WHERE project_id = ?",
                            (pid,))]
    if keys:
        await store._write_keys(keys)
    for share_id, digest, prefix, created, expires in conn.execute(
            "SELECT id, digest, prefix, created_at, expires_at FROM shares WHERE project_id = ?", (pid,)).fetchall():
        await store._write_share(bytes(digest), share_id, pid, prefix, created, expires or 0, False)
    for goal, created in conn.execute("SELECT goal, created_at FROM goals WHERE project_id = ?", (pid,)).fetchall():
        await store._write_goal(pid, goal, created, False)
    await store._write_project(project)


async def _person_ids(store: ClickHouseStore, conn, pid: int, fresh: bool, batch: int) -> int:
    rows = conn.execute(
        "SELECT i.distinct_id, p.distinct_id FROM person_ids i JOIN persons p ON p.id = i.person_id"
        " WHERE i.project_id = ?", (pid,)).fetchall()
    if not fresh:
        there = await _present(store, "person_ids", "distinct_id", pid, [d for d, _ in rows])
        rows = [row for row in rows if row[0] not in there]
    version = store._version()
    for start in range(0, len(rows), batch):
        await store.ch.insert(store.t("person_ids"), [c for c, _ in PERSON_ID_COLUMNS],
                              [k for _, k in PERSON_ID_COLUMNS],
                              [(pid, d, p, version) for d, p in rows[start:start + batch]], store.insert_settings)
    return len(rows)


async def _events(store: ClickHouseStore, conn, pid: int, fresh: bool, batch: int,
                  progress: Callable[[int], None]) -> int:
    traits = dict(conn.execute(
        "SELECT max(e.id), p.traits FROM events e JOIN persons p ON p.id = e.person_id WHERE e.project_id = ?"
        " AND p.traits IS NOT NULL GROUP BY e.person_id", (pid,)).fetchall())
    written = 0
    after = -1
    while True:
        rows = conn.execute(_EVENTS, (pid, after, batch)).fetchall()
        if not rows:
            return written
        after = rows[-1][0]
        if not fresh:
            there = await _present(store, "event_ids", "uuid", pid, [bytes(row[1]) for row in rows])
            rows = [row for row in rows if bytes(row[1]).hex().upper() not in there]
        out = []
        for (event_id, uid, ts, received, name, distinct_id, session, url, path, referrer, referrer_domain,
             utm_source, utm_medium, utm_campaign, props, _, country, language, screen, browser, os_name, device,
             bot, ip_hash) in rows:
            ip_hash = bytes(ip_hash or b"")[:IP_HASH_BYTES].ljust(IP_HASH_BYTES, b"\0")
            out.append((
                pid, ts, received, bytes(uid), name, distinct_id, distinct_id, session or "", url or "", path or "",
                referrer or "", referrer_domain or "", utm_source or "", utm_medium or "", utm_campaign or "",
                props or "", traits.get(event_id) or "", country or "", language or "", screen or "",
                browser or "Unknown", os_name or "Unknown", device or "other", int(bot or 0), ip_hash,
                int(name == PAGE_VIEW),
            ))
        await store.ch.insert(store.t("events"), [c for c, _ in EVENT_COLUMNS], [k for _, k in EVENT_COLUMNS], out,
                              store.insert_settings)
        written += len(out)
        progress(len(out))


async def _salts(store: ClickHouseStore, conn) -> None:
    for day, salt in conn.execute("SELECT day, salt FROM salts").fetchall():
        if not await store.ch.select(f"SELECT day FROM {store.t('salts')} WHERE day = {day} LIMIT 1"):
            await store.ch.insert(store.t("salts"), ["day", "salt", "created"], ["UInt32", "FixedString(16)", "Int64"],
                                  [(day, bytes(salt), 0)], store.insert_settings)


async def counts(store: ClickHouseStore, pid: int) -> dict[str, int]:
    """Events, persons and sessions of a project in the ClickHouse store."""
    events = (await store.ch.select(f"SELECT count() FROM {store.t('events')} WHERE project_id = {pid}"))[0][0]
    persons = (await store.ch.select(
        f"SELECT uniqExact(p) FROM (SELECT argMax(person, version) AS p FROM {store.t('person_ids')}"
        f" WHERE project_id = {pid} GROUP BY distinct_id)"))[0][0]
    sessions = (await store.ch.select(
        f"SELECT uniqExact(session) FROM {store.t('sessions')} WHERE project_id = {pid}"))[0][0]
    return {"events": events, "persons": persons, "sessions": sessions}


def event_span(db_path: Path, project_id: int) -> tuple[int, int] | None:
    """The first and last event time of a project in the SQLite database (None: it has no events)."""
    conn = connect(db_path, readonly=True)
    try:
        first, last = conn.execute("SELECT min(ts), max(ts) FROM events WHERE project_id = ?", (project_id,)).fetchone()
    finally:
        conn.close()
    return None if first is None else (first, last)


async def copy_sqlite(db_path: Path, store: ClickHouseStore, *, batch: int = BATCH_EVENTS,
                      progress: Callable[[int], None] = lambda n: None) -> list[Copied]:
    """Copy the SQLite database at `db_path` into `store`; per project what it holds, what was written, and the
    counts of both stores after."""
    conn = connect(db_path, readonly=True)
    try:
        conn.execute("BEGIN")  # one snapshot, while a server may go on writing
        projects = [Project(*row) for row in conn.execute(
            "SELECT id, name, domain, timezone, retention_days, created_at, allowed_origins, site_id FROM projects"
            " ORDER BY id")]
        there = await _target_projects(store, projects)
        copied = []
        for project in projects:
            pid = project.id
            found = Copied(project)
            for what in ("events", "persons", "sessions"):
                setattr(found, what, conn.execute(f"SELECT count(*) FROM {what} WHERE project_id = ?",
                                                  (pid,)).fetchone()[0])
            fresh = pid not in there
            if fresh:
                await _catalog(store, conn, project)
                found.catalog_written = True
            fresh = fresh and not (await counts(store, pid))["events"]
            found.ids_written = await _person_ids(store, conn, pid, fresh, batch)
            found.events_written = await _events(store, conn, pid, fresh, batch, progress)
            copied.append(found)
        await _salts(store, conn)
        await store._bump()
        conn.execute("COMMIT")
    finally:
        conn.close()
    for found in copied:
        target = await counts(store, found.project.id)
        found.counts = {what: (getattr(found, what), target[what]) for what in ("events", "persons", "sessions")}
    return copied
