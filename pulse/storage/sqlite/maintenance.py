"""Operations on a live database: verify aggregates against raw events, prune, back up, export.

Each works while `pulse serve` runs: reads hold one read transaction (a consistent snapshot; in WAL mode
the writer goes on), writes are short transactions that wait their turn for the write lock.
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator

from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import apsw

from pulse.storage.model import DAY_MS, HOUR_MS, PAGE_VIEW, Difference, Project
from pulse.storage.sqlite.connection import connect, create_private, immediate
from pulse.storage.sqlite.projects import PROJECT_DATA_TABLES, list_projects
from pulse.storage.sqlite.rollup_sets import DIM_AGENT, DIM_COUNTRY, DIM_LANGUAGE, DIM_PAGE, DIM_SCREEN

PRUNE_CHUNK = 2000


def pruned_before(conn: apsw.Connection, project_id: int) -> int:
    """Raw events before this time (ms, a whole hour) were pruned; aggregates still hold them."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"pruned_before:{project_id}",)).fetchone()
    return 0 if row is None else row[0]


# -- verify -----------------------------------------------------------------------------------------


def _page_view_id(conn: apsw.Connection) -> int:
    row = conn.execute("SELECT id FROM strings WHERE value = ?", (PAGE_VIEW,)).fetchone()
    return -1 if row is None else row[0]


def compare(project_id: int, what: str, stored: dict, recounted: dict, describe: Callable[[tuple], str]
             ) -> Iterator[Difference]:
    for key in sorted(stored.keys() | recounted.keys()):
        a, b = stored.get(key), recounted.get(key)
        if a != b:
            yield Difference(project_id, what, describe(key), a, b)


def verify(conn: apsw.Connection, projects: list[Project] | None = None) -> list[Difference]:
    """Recount hourly rollups, dimension rollups, sessions and persons from raw events; every difference.

    Checking every project (`projects` None) also counts the rows of each table that belong to no project
    (nothing reads them). Runs in one read transaction, so it sees one committed state even while the
    writer works.
    """
    found: list[Difference] = []
    conn.execute("BEGIN")
    try:
        page_view = _page_view_id(conn)
        for project in projects if projects is not None else list_projects(conn):
            found += _verify_project(conn, project.id, page_view)
        if projects is None:
            found += _orphans(conn)
    finally:
        conn.execute("COMMIT")
    return found


def _orphans(conn: apsw.Connection) -> Iterator[Difference]:
    """How many rows each table holds of each project id that is not a project's: one index seek per id."""
    existing = {project_id for (project_id,) in conn.execute("SELECT id FROM projects")}
    for table in (*PROJECT_DATA_TABLES, "keys"):  # each indexed by project_id first
        after = -1 << 63
        while True:
            row = conn.execute(f"SELECT project_id FROM {table} WHERE project_id > ? ORDER BY project_id LIMIT 1",
                               (after,)).fetchone()
            if row is None:
                break
            after = row[0]
            if after not in existing:
                count = conn.execute(f"SELECT count(*) FROM {table} WHERE project_id = ?", (after,)).fetchone()[0]
                yield Difference(after, table, "rows (no such project)", count, 0)


def _verify_project(conn: apsw.Connection, pid: int, page_view: int) -> list[Difference]:
    cut = pruned_before(conn, pid)
    first_hour = cut // HOUR_MS
    # events whose rollup changes the writer still keeps in memory count once they are written
    raw = ("FROM events e LEFT JOIN agents a ON a.id = e.agent_id WHERE e.project_id = ? AND e.ts >= ?"
           " AND e.id <= (SELECT value FROM meta WHERE key = 'derived_through')")
    found: list[Difference] = []

    stored = {(h, n, b): (ev, us, ss) for h, n, b, ev, us, ss in conn.execute(
        "SELECT hour, name_id, bot, sum(events), sum(users), sum(sessions) FROM hourly"
        " WHERE project_id = ? AND hour >= ? GROUP BY 1, 2, 3", (pid, first_hour))}
    recounted: dict = {}
    for grouping in ("e.name_id", "0"):
        for h, n, b, ev, us, ss in conn.execute(
            f"SELECT e.ts / {HOUR_MS}, {grouping}, coalesce(a.is_bot, 0), count(*), count(DISTINCT e.person_id),"
            f" count(DISTINCT e.session_id) {raw} GROUP BY 1, 2, 3", (pid, cut)):
            recounted[(h, n, b)] = (ev, us, ss)
    found += compare(pid, "hourly", stored, recounted,
                      lambda k: f"hour {_hour(k[0])} name {k[1]} bot {k[2]} (events, users, sessions)")

    stored = {(d, h, v, b): (ev, us) for d, h, v, b, ev, us in conn.execute(
        "SELECT dim, hour, value_id, bot, sum(events), sum(users) FROM hourly_dims"
        " WHERE project_id = ? AND hour >= ? GROUP BY 1, 2, 3, 4", (pid, first_hour))}
    recounted = {(DIM_AGENT, h, v, b): (ev, us) for h, v, b, ev, us in conn.execute(
        f"SELECT e.ts / {HOUR_MS}, e.agent_id, coalesce(a.is_bot, 0), count(*), count(DISTINCT e.person_id) {raw}"
        " GROUP BY 1, 2, 3", (pid, cut))}
    recounted.update({(DIM_PAGE, h, v, b): (ev, us) for h, v, b, ev, us in conn.execute(
        f"SELECT e.ts / {HOUR_MS}, e.path_id, coalesce(a.is_bot, 0), count(*), count(DISTINCT e.person_id) {raw}"
        " AND e.name_id = ? AND e.path_id IS NOT NULL GROUP BY 1, 2, 3", (pid, cut, page_view))})
    for dim, column in ((DIM_COUNTRY, "country_id"), (DIM_LANGUAGE, "language_id"), (DIM_SCREEN, "screen_id")):
        recounted.update({(dim, h, v, b): (ev, us) for h, v, b, ev, us in conn.execute(
            f"SELECT e.ts / {HOUR_MS}, e.{column}, coalesce(a.is_bot, 0), count(*), count(DISTINCT e.person_id)"
            f" {raw} AND e.{column} IS NOT NULL GROUP BY 1, 2, 3", (pid, cut))})
    found += compare(pid, "hourly_dims", stored, recounted,
                      lambda k: f"dim {k[0]} hour {_hour(k[1])} value {k[2]} bot {k[3]} (events, users)")

    stored = {(i,): (ev, pv, f, last) for i, ev, pv, f, last in conn.execute(
        "SELECT id, events, pageviews, first_ts, last_ts FROM sessions WHERE project_id = ? AND first_ts >= ?",
        (pid, cut))}
    recounted = {(i,): (ev, pv, f, last) for i, ev, pv, f, last in conn.execute(
        "SELECT e.session_id, count(*), sum(e.name_id = ?), min(e.ts), max(e.ts) FROM events e"
        " WHERE e.project_id = ? AND e.session_id IN (SELECT id FROM sessions WHERE project_id = ? AND first_ts >= ?)"
        " GROUP BY 1", (page_view, pid, pid, cut))}
    # sessions and persons the writer still keeps changes of in memory are checked once those are written
    later = conn.execute(
        "SELECT DISTINCT session_id, person_id FROM events WHERE project_id = ?"
        " AND id > (SELECT min(value) FROM meta WHERE key IN ('derived_through', 'rows_through'))", (pid,)).fetchall()
    _leave_out({(session_id,) for session_id, _ in later}, stored, recounted)
    found += compare(pid, "session", stored, recounted, lambda k: f"{k[0]} (events, page views, first, last)")

    # every day a session starts on is marked, so readers can tell when its sessions change
    stored = {(day,): "marked" for (day,) in conn.execute(
        "SELECT day FROM session_days WHERE project_id = ? AND day >= ?", (pid, cut // DAY_MS))}
    recounted = {(day,): "marked" for (day,) in conn.execute(
        f"SELECT DISTINCT first_ts / {DAY_MS} FROM sessions WHERE project_id = ? AND first_ts >= ?",
        (pid, cut // DAY_MS * DAY_MS))}
    found += compare(pid, "session_days", stored, recounted, lambda k: f"day {_day(k[0])}")

    stored = {(i,): (ev, f, last) for i, ev, f, last in conn.execute(
        "SELECT id, event_count, first_seen, last_seen FROM persons WHERE project_id = ? AND first_seen >= ?",
        (pid, cut))}
    recounted = {(i,): (ev, f, last) for i, ev, f, last in conn.execute(
        "SELECT e.person_id, count(*), min(e.ts), max(e.ts) FROM events e WHERE e.project_id = ?"
        " AND e.person_id IN (SELECT id FROM persons WHERE project_id = ? AND first_seen >= ?) GROUP BY 1",
        (pid, pid, cut))}
    _leave_out({(person_id,) for _, person_id in later}, stored, recounted)
    for key in stored.keys() - recounted.keys():
        if stored[key][0] == 0:  # a person made by identify alone, with no event of its own
            recounted[key] = stored[key]
    found += compare(pid, "person", stored, recounted, lambda k: f"{k[0]} (events, first seen, last seen)")
    return found


def _leave_out(keys: set[tuple], *found: dict) -> None:
    for key in keys:
        for each in found:
            each.pop(key, None)


def _day(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, tz=timezone.utc).strftime("%Y-%m-%d")


def _hour(hour: int) -> str:
    return datetime.fromtimestamp(hour * 3600, tz=timezone.utc).strftime("%Y-%m-%dT%H:00Z")


# -- prune ------------------------------------------------------------------------------------------


def prune(conn: apsw.Connection, now_ms: int, *, chunk: int = PRUNE_CHUNK, pause_s: float = 0.005,
          projects: list[Project] | None = None) -> dict[str, int]:
    """Delete raw events older than each project's retention (whole hours), `chunk` rows per transaction.

    Rollups, sessions and persons are left as they are: numbers over pruned hours stay right, only
    filters that need raw events find nothing there. Short transactions and a pause between them let
    the server's writer in; it waits for the lock rather than failing.
    """
    deleted: dict[str, int] = {}
    for project in projects if projects is not None else list_projects(conn):
        cutoff = (now_ms - project.retention_days * DAY_MS) // HOUR_MS * HOUR_MS
        total = 0
        while True:
            with immediate(conn):
                conn.execute("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE project_id = ? AND ts < ?"
                             " LIMIT ?)", (project.id, cutoff, chunk))
                removed = conn.changes()
                if removed < chunk:
                    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                                 " SET value = max(value, excluded.value)", (f"pruned_before:{project.id}", cutoff))
            total += removed
            if removed < chunk:
                break
            time.sleep(pause_s)
        deleted[project.name] = total
    return deleted


# -- backup -----------------------------------------------------------------------------------------


def backup(source: Path, destination: Path) -> tuple[Path, int]:
    """A consistent copy of the live database at `destination` (written beside it, then renamed); the file
    written (named by the time when `destination` is a directory) and its size.

    The copy is made in one read transaction (SQLite's backup API in one step), so the writer carries on
    meanwhile and the copy is the state of one commit.
    """
    destination = destination.resolve()
    if destination.exists() and destination.is_dir():
        destination = destination / f"pulse-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.db"
    temporary = destination.with_name(destination.name + ".partial")
    temporary.unlink(missing_ok=True)
    create_private(temporary)  # a backup holds what the database holds: its owner's alone, like it
    src = connect(source, readonly=True)
    dest = apsw.Connection(str(temporary))
    try:
        with dest.backup("main", src, "main") as copy:
            copy.step(-1)
        dest.pragma("journal_mode", "delete")  # a single self-contained file
        if dest.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise RuntimeError("the copy failed its integrity check")
    finally:
        dest.close()
        src.close()
    os.replace(temporary, destination)
    return destination, destination.stat().st_size


# -- export -----------------------------------------------------------------------------------------

EXPORT_COLUMNS = ("uuid", "event", "timestamp", "distinct_id", "session_id", "path", "url", "referrer", "browser",
                  "os", "device", "properties")
_EXPORT = (
    "SELECT e.uuid, n.value, e.ts, p.distinct_id, s.session_key, pa.value, u.value, r.value, a.browser, a.os,"
    " a.device, e.props FROM events e JOIN strings n ON n.id = e.name_id JOIN persons p ON p.id = e.person_id"
    " LEFT JOIN sessions s ON s.id = e.session_id LEFT JOIN strings pa ON pa.id = e.path_id"
    " LEFT JOIN strings u ON u.id = e.url_id LEFT JOIN strings r ON r.id = e.referrer_id"
    " LEFT JOIN agents a ON a.id = e.agent_id WHERE e.project_id = ? AND e.ts >= ? AND e.ts < ? ORDER BY e.ts, e.id"
)


def export(conn: apsw.Connection, project_id: int, start_ms: int, end_ms: int, fmt: str, out: TextIO) -> int:
    """Write the project's events in [start, end) to `out`, oldest first, one row at a time; how many."""
    written = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
    conn.execute("BEGIN")
    try:
        for row in conn.execute(_EXPORT, (project_id, start_ms, end_ms)):
            record = (str(uuid.UUID(bytes=row[0])), row[1], _iso_ms(row[2]), *row[3:11], row[11])
            if fmt == "csv":
                writer.writerow(["" if v is None else v for v in record])
            else:
                item = dict(zip(EXPORT_COLUMNS, record))
                item["properties"] = None if row[11] is None else json.loads(row[11])
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
            written += 1
    finally:
        conn.execute("COMMIT")
    return written


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- status -----------------------------------------------------------------------------------------


def database_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def events_since(conn: apsw.Connection, project_id: int, start_ms: int) -> int:
    return conn.execute("SELECT count(*) FROM events WHERE project_id = ? AND ts >= ?",
                        (project_id, start_ms)).fetchone()[0]

