"""Operations on the ClickHouse store against real ClickHouse (one 18.16 server, a two-shard cluster, chdb):
`pulse migrate` from a SQLite data directory filled through a real `pulse serve` (every overview, timeseries
and top-events answer equal afterwards, a second run writes nothing), verify (nothing after ingest, a rollup
row no event explains), prune (old months and the rest past retention gone, the rollups kept), export and
backup."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timezone

import aiohttp
import pytest

from pulse.config import Settings
from pulse.storage.base import open_store
from pulse.storage.model import DAY_MS, Filters, NotAvailable, Window
from tests.clickhouse.test_store_core import (  # noqa: F401 (clickhouse: the module's servers)
    HOUR, _store_url, answers, clickhouse, nodes, send, traffic,
)
from tests.clickhouse_servers import MISSING
from tests.servers import Server, pulse

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def migrate(data_dir, url: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "pulse.cli", "migrate", "--to", url, "--data-dir", str(data_dir),
                           "--json", "--batch", "5"], capture_output=True, text=True)
    return done.returncode, json.loads(done.stdout or "{}")


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_migrate_copies_a_sqlite_store_that_then_answers_alike(backend, clickhouse, tmp_path):
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    batches = traffic(now, seed=11)
    windows = [{"from": _iso(now - 24 * HOUR), "to": _iso(now)}, {"from": _iso(now - 7 * 24 * HOUR), "to": _iso(now)},
               {"from": _iso(now - 13 * HOUR - 17 * 60_000), "to": _iso(now - 2 * HOUR - 5 * 60_000)}]
    data_dir = tmp_path / "sqlite"
    shop = json.loads(pulse("projects", "create", "shop", "--json", data_dir=data_dir).stdout)
    json.loads(pulse("projects", "create", "empty", "--json", data_dir=data_dir).stdout)
    pulse("goals", "add", "shop", "signup", data_dir=data_dir)
    server = Server(data_dir, log_path=tmp_path / "sqlite.log")
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for batch in batches:
                assert (await send(session, server.url, shop["ingest_key"], batch))[0] == 202
            reference = [await answers(session, server.url, shop["id"], shop["read_token"], w) for w in windows]
    finally:
        server.stop(15)

    url = _store_url(backend, clickhouse, tmp_path)
    code, report = migrate(data_dir, url)
    assert code == 0 and report["ok"], report
    events = sum(len(batch) for batch in batches)
    copied = {entry["project"]: entry for entry in report["projects"]}
    assert copied["shop"]["events"] == {"sqlite": events, "clickhouse": events}
    assert copied["shop"]["overview"]["equal"] and copied["shop"]["events_written"] == events
    assert copied["empty"]["events"] == {"sqlite": 0, "clickhouse": 0}
    code, again = migrate(data_dir, url)  # a second run finds everything there
    assert code == 0 and again["ok"] and [e["events_written"] for e in again["projects"]] == [0, 0]

    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for node in urls:  # the SQLite keys work, and every answer is SQLite's
            found = [await answers(session, node, shop["id"], shop["read_token"], w) for w in windows]
            for mine, theirs in zip(found, reference):
                for endpoint in ("overview", "timeseries", "top-events"):
                    assert mine[endpoint] == theirs[endpoint], endpoint
        status, body = await send(session, urls[0], shop["ingest_key"], batches[0])
        assert (status, body) == (202, {"accepted": 0, "duplicates": len(batches[0])})
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        project = await store.get_project("shop")
        assert [g["goal"] for g in await store.list_goals(project)] == ["signup"]
        assert await store.verify() == []


async def test_migrate_refuses_a_store_holding_other_projects(clickhouse, tmp_path):
    url = _store_url("single", clickhouse, tmp_path)
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        await store.create_project("theirs")
    data_dir = tmp_path / "sqlite"
    pulse("projects", "create", "shop", data_dir=data_dir)
    done = subprocess.run([sys.executable, "-m", "pulse.cli", "migrate", "--to", url, "--data-dir", str(data_dir)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "already holds project 'theirs'" in done.stderr
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        assert [p.name for p in await store.list_projects()] == ["theirs"]


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_verify_prune_export_and_backup(backend, clickhouse, tmp_path):
    url = _store_url(backend, clickhouse, tmp_path)
    settings = Settings(data_dir=tmp_path / "cli", store=url)
    async with open_store(settings, serve=False) as store:
        project, ingest_key, _ = await store.create_project("shop", retention_days=30)
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    # 100 days old (a month wholly past the retention), 31 days old, and recent
    ages = {"old": 100 * DAY_MS, "past": 31 * DAY_MS + HOUR, "recent": HOUR}
    sent = {kind: [{"event": "page_view", "uuid": f"00000000-0000-4000-8000-{i:06d}{n:06d}",
                    "distinct_id": f"{kind}{n % 3}", "page_url": f"https://shop.example/{kind}",
                    "properties": {"n": n}, "timestamp": datetime.fromtimestamp((now - age + n * 60_000) / 1000,
                                                                                timezone.utc).isoformat()}
                   for n in range(6)] for i, (kind, age) in enumerate(ages.items())}
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for batch in sent.values():
            assert (await send(session, urls[0], ingest_key, batch))[0] == 202
    async with open_store(settings, serve=False) as store:
        assert await store.verify() == []
        whole = Window((now - 101 * DAY_MS) // HOUR * HOUR, (now // HOUR + 1) * HOUR)
        before = await store.overview(project.id, whole, Filters(), now)
        assert before.events == 18

        assert await store.prune(now) == {"shop": 12}
        out = io.StringIO()
        assert await store.export(project.id, 0, now + 1, "jsonl", out) == 6
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [r["uuid"] for r in rows] == [e["uuid"] for e in sent["recent"]]
        assert list(rows[0]) == ["uuid", "event", "timestamp", "distinct_id", "session_id", "path", "url",
                                 "referrer", "browser", "os", "device", "properties"]
        assert (rows[0]["path"], rows[0]["referrer"], rows[0]["browser"], rows[0]["properties"]) == (
            "/recent", None, "Firefox", {"n": 0})
        out = io.StringIO()
        assert await store.export(project.id, 0, now + 1, "csv", out) == 6
        assert out.getvalue().splitlines()[0] == "uuid,event,timestamp,distinct_id,session_id,path,url,referrer," \
                                                 "browser,os,device,properties"
        after = await store.overview(project.id, whole, Filters(), now)
        assert (after.events, after.unique_users, after.sessions) == (before.events, before.unique_users,
                                                                      before.sessions)  # the rollups stay
        assert await store.verify() == []  # the pruned hours are not recounted

        hour = (now - HOUR) // HOUR
        await store.ch.execute(
            f"INSERT INTO {store.db}.hourly (project_id, bot, hour, name, events, users, sessions)"
            f" SELECT {project.id}, 0, {hour}, 'ghost', countState(), uniqExactState('p'), uniqExactState('s')"
            " FROM system.one")
        found = await store.verify()
        assert [(d.what, d.stored, d.recounted) for d in found] == [("hourly", (1, 1, 1), None)]
        assert "name ghost" in found[0].key

        with pytest.raises(NotAvailable, match="clickhouse-backup"):
            await store.backup(tmp_path / "backup")
