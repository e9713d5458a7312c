"""The ClickHouse store's period questions read persons and sessions from per-day and per-hour sets
(`people_daily`, `people_hourly`) and session sums over the sessions `session_starts` names: on one 18.16
server, a two-shard cluster and chdb, a store whose events were stored before those tables existed (copied in
at connect) and then more events (written by their views) answers timeseries and overviews cut through days in
UTC, India (+5:30) and New York exactly as a recount in Python, with and without an event filter; and the new
tables hold exactly the persons and sessions of the events."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest

from pulse.config import Settings
from pulse.protocol import Counts, IngestEvent
from pulse.server.params import bucket_bounds
from pulse.storage.base import open_store
from pulse.storage.model import DAY_MS, HOUR_MS, PAGE_VIEW, Filters, IngestJob, Window, now_ms
from tests.clickhouse.test_store_core import _store_url, clickhouse  # noqa: F401 (the servers' fixture)
from tests.clickhouse_servers import MISSING

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
PERIOD_TABLES = ("people_hourly", "people_daily", "session_starts")
NAMES = (PAGE_VIEW, PAGE_VIEW, "click", "signup")


def month_of_events(now: int) -> list[dict]:
    """Sessions of 30 persons over four days ending an hour ago, some across midnights (UTC and local)."""
    rng = random.Random(11)
    start = now - 4 * DAY_MS - HOUR_MS
    found = []
    for number in range(160):
        person = f"u{rng.randrange(30)}"
        ts = start + rng.randrange(4 * DAY_MS - 3 * HOUR_MS)
        for step in range(rng.randrange(1, 7)):
            found.append({"event": PAGE_VIEW if step == 0 else rng.choice(NAMES), "distinct_id": person,
                          "session": f"s{number}", "ts": ts, "path": f"/p{rng.randrange(4)}"})
            ts += rng.randrange(1, 50) * 60_000
    return found


def recount(events: list[dict], bounds: list[int], event: str | None = None) -> list[Counts]:
    found = []
    for start, end in zip(bounds, bounds[1:]):
        inside = [e for e in events if start <= e["ts"] < end and event in (None, e["event"])]
        found.append(Counts(len(inside), len({e["distinct_id"] for e in inside}), len({e["session"] for e in inside})))
    return found


def session_sums(events: list[dict], window: Window) -> tuple[int, int, int, int]:
    """(sessions, bounces, duration ms, page views) of the sessions that started in the window."""
    sessions = defaultdict(list)
    for e in events:
        sessions[e["session"]].append(e)
    started = [s for s in sessions.values() if window.start <= min(e["ts"] for e in s) < window.end]
    return (len(started), sum(len(s) == 1 for s in started),
            sum(max(e["ts"] for e in s) - min(e["ts"] for e in s) for s in started),
            sum(e["event"] == PAGE_VIEW for s in started for e in s))


async def ingest(store, project_id: int, events: list[dict]) -> None:
    jobs = [IngestJob(project_id, [IngestEvent(event=e["event"], distinct_id=e["distinct_id"], session_id=e["session"],
                                               timestamp=e["ts"], page_url="https://shop.example" + e["path"])
                                   for e in events[i:i + 50]], now_ms(), 0, "192.0.2.1", UA)
            for i in range(0, len(events), 50)]
    for job in jobs:
        await store.enqueue(job)


async def drop_period_tables(store) -> None:
    """The store as it was before the period tables: their views, tables and backfill marks gone."""
    for transport in store.transports:
        for table in PERIOD_TABLES:
            for name in (f"{table}_mv", f"{table}_all", table):
                await transport.execute(f"DROP TABLE IF EXISTS {store.db}.{name}")
        await transport.execute(f"DROP TABLE IF EXISTS {store.db}.backfills")


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_periods_from_day_and_hour_sets_match_a_recount(backend, clickhouse, tmp_path: Path):  # noqa: F811
    url = _store_url(backend, clickhouse, tmp_path)
    settings = Settings(data_dir=tmp_path / "data", store=url)
    now = now_ms()
    events = month_of_events(now)
    events.sort(key=lambda e: e["ts"])
    half = len(events) // 2
    async with open_store(settings) as store:
        project, _, _ = await store.create_project("shop")
        await drop_period_tables(store)
        await ingest(store, project.id, events[:half])
    async with open_store(settings) as store:  # the earlier events copied in at connect, the rest by the views
        await ingest(store, project.id, events[half:])
        window = Window(now - 3 * DAY_MS - 5 * HOUR_MS - 123_457, now - 7 * HOUR_MS - 98_765)
        for zone in ("UTC", "Asia/Kolkata", "America/New_York"):
            for interval in ("day", "hour"):
                bounds = bucket_bounds(window, interval, zone)
                assert await store.timeseries(project.id, bounds, Filters()) == recount(events, bounds), (zone, interval)
                assert (await store.timeseries(project.id, bounds, Filters(event="click"))
                        == recount(events, bounds, "click")), (zone, interval)
        for chosen in (window, Window(window.start - DAY_MS, window.end - 2 * DAY_MS)):
            overview = await store.overview(project.id, chosen, Filters(), now)
            whole = recount(events, [chosen.start, chosen.end])[0]
            assert (overview.events, overview.unique_users, overview.sessions) == (whole.events, whole.unique_users, whole.sessions)
            assert await store._session_sums(project.id, chosen, Filters()) == session_sums(events, chosen)
        every = recount(events, [0, now + HOUR_MS])[0]
        for table in ("people_hourly", "people_daily"):
            held = await store.ch.select(f"SELECT uniqExactMerge(users), uniqExactMerge(sessions) FROM {store.t(table)}"
                                         f" WHERE project_id = {project.id} AND bot = 0")
            assert held == [(every.unique_users, every.sessions)], table
        starts = await store.ch.select(f"SELECT uniqExact(session) FROM {store.t('session_starts')}"
                                       f" WHERE project_id = {project.id}")
        assert starts == [(every.sessions,)]
