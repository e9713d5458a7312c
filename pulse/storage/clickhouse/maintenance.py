"""Operations on the ClickHouse store: verify the rollups against raw events, prune, export; and why backup is
ClickHouse's own tool's job.

- verify: the materialized views (`hourly`, `sessions`) recounted from `events`, and every event's person
  checked against `person_ids`, as the SQLite store's verify recounts its rollups, sessions and persons.
  ClickHouse writes an insert's events and what its views add as separate parts, so a read can see one
  without the other for an instant: keys that differ are read again after SETTLE_S, and only those that
  still differ are reported.
- prune: raw events older than each project's retention (whole hours, as SQLite's prune) are deleted. A month
  partition of `events` that only holds events past the retention of every project in it is dropped whole
  (instant, on every shard); the rest goes by `ALTER … DELETE` (a mutation ClickHouse runs behind; prune
  waits for it). The rollups stay, so counts over pruned hours are unchanged; the cut is kept in `pruned`.
- export: the rows of SQLite's export, in the same formats, read page by page in (ts, uuid) order.
- backup: not done over HTTP. A consistent copy of a ClickHouse database is a snapshot of its parts on each
  server's disk (`ALTER TABLE … FREEZE`, which `clickhouse-backup` drives, or `BACKUP DATABASE` on 22.8 and
  later); rows read over HTTP table after table are not one state (inserts land between the reads, and the
  aggregating tables hold states that only restore as parts).
"""

from __future__ import annotations

import asyncio
import calendar
import csv
import json
import time
import uuid
from typing import TYPE_CHECKING, TextIO

from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import DAY_MS, HOUR_MS, Difference, NotAvailable, Project
from pulse.storage.sqlite.maintenance import EXPORT_COLUMNS, _hour, _iso_ms, compare

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

SETTLE_S = 1.0  # before differing keys are read again (an insert's parts and its views' become visible apart)
MUTATION_WAIT_S = 600.0  # the longest prune waits for ClickHouse to finish its deletes
MUTATION_POLL_S = 0.2
EXPORT_PAGE = 10_000  # rows per read of an export
BACKUP_TOOLS = ("a consistent ClickHouse backup is a snapshot of each server's parts: use clickhouse-backup"
                " (ALTER TABLE … FREEZE on every shard), or BACKUP DATABASE on ClickHouse 22.8 or later;"
                " pulse export and pulse migrate copy events out")


# -- verify -----------------------------------------------------------------------------------------


async def pruned_before(store: ClickHouseStore, project_id: int) -> int:
    """Raw events before this time (ms, a whole hour) were pruned; the rollups still hold them."""
    rows = await store.ch.select(f"SELECT max(before) FROM {store.t('pruned')} WHERE project_id = {project_id}")
    return int(rows[0][0] or 0) if rows else 0


async def _hourly(store: ClickHouseStore, pid: int, cut: int) -> tuple[dict, dict]:
    stored = {(h, n, b): (e, u, s) for h, n, b, e, u, s in await store.ch.select(
        "SELECT hour, name, bot, countMerge(events), uniqExactMerge(users), uniqExactMerge(sessions)"
        f" FROM {store.t('hourly')} WHERE project_id = {pid} AND hour >= {cut // HOUR_MS} GROUP BY hour, name, bot")}
    recounted = {(h, n, b): (e, u, s) for h, n, b, e, u, s in await store.ch.select(
        "SELECT toUInt32(intDiv(ts, 3600000)) AS h, name, bot, count(), uniqExact(person), uniqExact(session)"
        f" FROM {store.t('events')} WHERE project_id = {pid} AND ts >= {cut} GROUP BY h, name, bot")}
    return stored, recounted


async def _sessions(store: ClickHouseStore, pid: int, cut: int) -> tuple[dict, dict]:
    """Sessions that began at or after the cut (the raw events of earlier ones are partly pruned)."""
    stored = {(s,): (e, pv, f, last) for s, e, pv, f, last in await store.ch.select(
        "SELECT session, countMerge(events), sumMerge(pageviews), minMerge(first) AS f, maxMerge(last)"
        f" FROM {store.t('sessions')} WHERE project_id = {pid} GROUP BY session")}
    recounted = {(s,): (e, pv, f, last) for s, e, pv, f, last in await store.ch.select(
        f"SELECT session, count(), sum(page), min(ts), max(ts) FROM {store.t('events')}"
        f" WHERE project_id = {pid} AND ts >= {cut} GROUP BY session")}
    for key in [key for key, value in stored.items() if value[2] < cut]:
        del stored[key]
        recounted.pop(key, None)
    return stored, recounted


async def _persons(store: ClickHouseStore, pid: int, cut: int) -> tuple[dict, dict]:
    """Each distinct id events were stored under: the person `person_ids` maps it to, and the persons its
    events carry (one, unless two nodes raced on a new id and their commits disagree)."""
    recounted: dict[tuple, set] = {}
    for distinct_id, person in await store.ch.select(
        f"SELECT DISTINCT distinct_id, person FROM {store.t('events')} WHERE project_id = {pid} AND ts >= {cut}"
    ):
        recounted.setdefault((distinct_id,), set()).add(person)
    stored = {(d,): (p,) for d, p in await store.ch.select(
        f"SELECT distinct_id, argMax(person, version) FROM {store.t('person_ids')}"
        f" WHERE project_id = {pid} GROUP BY distinct_id")}
    recounted_rows = {key: tuple(sorted(persons)) for key, persons in recounted.items()}
    stored = {key: value for key, value in stored.items() if key in recounted_rows}  # ids linked by identify alone
    return stored, recounted_rows


_CHECKS = (
    ("hourly", _hourly, lambda k: f"hour {_hour(k[0])} name {k[1]} bot {k[2]} (events, users, sessions)"),
    ("session", _sessions, lambda k: f"{k[0]} (events, page views, first, last)"),
    ("person", _persons, lambda k: f"distinct id {k[0]} (person)"),
)


async def _differences(store: ClickHouseStore, projects: list[Project]) -> dict[tuple, Difference]:
    found: dict[tuple, Difference] = {}
    for project in projects:
        cut = await pruned_before(store, project.id)
        for what, check, describe in _CHECKS:
            stored, recounted = await check(store, project.id, cut)
            for difference in compare(project.id, what, stored, recounted, describe):
                found[(project.id, what, difference.key)] = difference
    return found


async def _orphans(store: ClickHouseStore) -> list[Difference]:
    """Events of project ids that are no project's (a deleted project's, until ClickHouse ran the delete)."""
    existing = {p.id for p in await store.list_projects()}
    return [Difference(pid, "events", "rows (no such project)", count, 0) for pid, count in await store.ch.select(
        f"SELECT project_id, count() FROM {store.t('events')} GROUP BY project_id ORDER BY project_id")
        if pid not in existing]


async def verify(store: ClickHouseStore, chosen: list[Project] | None) -> list[Difference]:
    projects = chosen if chosen is not None else await store.list_projects()
    found = await _differences(store, projects)
    if found:  # what an insert in flight showed half of is whole by now
        await asyncio.sleep(SETTLE_S)
        again = await _differences(store, [p for p in projects if any(k[0] == p.id for k in found)])
        found = {key: difference for key, difference in again.items() if key in found}
    result = list(found.values())
    if chosen is None:
        result += await _orphans(store)
    return result


# -- prune ------------------------------------------------------------------------------------------


def _month_end_ms(month: int) -> int:
    """The first millisecond after the month YYYYMM (UTC)."""
    year, number = divmod(month, 100)
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return calendar.timegm((year, number, 1, 0, 0, 0)) * 1000


async def _wait_for_mutations(store: ClickHouseStore) -> None:
    deadline = time.monotonic() + MUTATION_WAIT_S
    for transport in store.transports:
        while time.monotonic() < deadline:
            rows = await transport.select(
                f"SELECT count() FROM system.mutations WHERE database = {sql_literal(store.db)} AND is_done = 0")
            if rows[0][0] == 0:
                break
            await asyncio.sleep(MUTATION_POLL_S)


async def prune(store: ClickHouseStore, now_ms: int) -> dict[str, int]:
    projects = await store.list_projects()
    cutoffs = {p.id: (now_ms - p.retention_days * DAY_MS) // HOUR_MS * HOUR_MS for p in projects}
    deleted = {p.id: 0 for p in projects}
    db = store.db
    month = "toYYYYMM(toDateTime(intDiv(ts, 1000)))"
    for transport in store.transports:  # whole months, shard by shard
        for (partition,) in await transport.select(
            f"SELECT DISTINCT partition FROM system.parts WHERE database = {sql_literal(db)} AND table = 'events'"
            " AND active ORDER BY partition"
        ):
            end = _month_end_ms(int(partition))
            counts = await transport.select(
                f"SELECT project_id, count() FROM {db}.events WHERE {month} = {int(partition)} GROUP BY project_id")
            # a project no longer listed was deleted: its rows go with it
            if all(end <= cutoffs.get(pid, end) for pid, _ in counts):
                await transport.execute(f"ALTER TABLE {db}.events DROP PARTITION {int(partition)}")
                for pid, count in counts:
                    if pid in deleted:
                        deleted[pid] += count
    for project in projects:
        cutoff = cutoffs[project.id]
        where = f"project_id = {project.id} AND ts < {cutoff}"
        rest = (await store.ch.select(f"SELECT count() FROM {store.t('events')} WHERE {where}"))[0][0]
        for transport in store.transports:
            if rest:
                await transport.execute(f"ALTER TABLE {db}.events DELETE WHERE {where}")
            await transport.execute(f"ALTER TABLE {db}.event_ids DELETE WHERE {where}")
        deleted[project.id] += rest
        if cutoff > await pruned_before(store, project.id):
            await store.ch.insert(store.t("pruned"), ["project_id", "before"], ["UInt32", "Int64"],
                                  [(project.id, cutoff)], store.insert_settings)
    await _wait_for_mutations(store)
    return {p.name: deleted[p.id] for p in projects}


# -- export -----------------------------------------------------------------------------------------


async def export(store: ClickHouseStore, project_id: int, start_ms: int, end_ms: int, fmt: str, out: TextIO) -> int:
    """The project's events in [start, end), oldest first (ties by uuid), EXPORT_PAGE rows per read."""
    written = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
    after = ""
    while True:
        rows = await store.ch.select(
            "SELECT ts, hex(uuid) AS u, name, distinct_id, session, path, url, referrer, browser, os, device, props"
            f" FROM {store.t('events')} WHERE project_id = {project_id} AND ts >= {start_ms} AND ts < {end_ms}"
            f"{after} ORDER BY ts, u LIMIT {EXPORT_PAGE}")
        for ts, uid, *values, props in rows:
            values = [value or None for value in values]
            record = (str(uuid.UUID(hex=uid)), values[0], _iso_ms(ts), *values[1:], props or None)
            if fmt == "csv":
                writer.writerow(["" if v is None else v for v in record])
            else:
                item = dict(zip(EXPORT_COLUMNS, record))
                item["properties"] = None if not props else json.loads(props)
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
            written += 1
        if len(rows) < EXPORT_PAGE:
            return written
        ts, uid = rows[-1][0], rows[-1][1]
        after = f" AND (ts > {ts} OR (ts = {ts} AND hex(uuid) > {sql_literal(uid)}))"


# -- backup -----------------------------------------------------------------------------------------


def backup() -> NotAvailable:
    return NotAvailable(f"backup is not available on the ClickHouse store: {BACKUP_TOOLS}")
