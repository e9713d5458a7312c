"""The ClickHouse store against real ClickHouse: one 18.16 server behind two `pulse serve` nodes, a two-shard
cluster behind two nodes, and a current engine in-process (chdb) behind one. Events go in through the real
ingest API; overview, timeseries and top events must equal a recount in plain Python and the SQLite store's
answers for the same events; a batch sent again to another node is counted once; a key rotated through one
node's store works on the others within a poll; bad input is a 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pulse.config import Settings
from pulse.server.app import create_app
from pulse.storage.base import open_store
from tests.clickhouse_servers import CLUSTER, MISSING, start_servers, stop_servers
from tests.servers import Server, pulse

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

HOUR = 3_600_000
GAP = 30 * 60_000
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory):
    """A single server and a two-shard cluster, for every test of the module."""
    single = start_servers(tmp_path_factory.mktemp("ch-single"), 1)
    try:
        shards = start_servers(tmp_path_factory.mktemp("ch-cluster"), 2)
    except BaseException:
        stop_servers(single)
        raise
    yield {"single": single, "cluster": shards}
    stop_servers(single + shards)


def _store_url(backend: str, clickhouse: dict, tmp_path: Path) -> str:
    database = "t" + uuid.uuid4().hex[:12]
    if backend == "chdb":
        return f"chdb://{tmp_path / 'chdb'}?database={database}"
    servers = clickhouse[backend]
    hosts = ",".join(f"127.0.0.1:{server.http_port}" for server in servers)
    return f"clickhouse://{hosts}/{database}" + (f"?cluster={CLUSTER}" if backend == "cluster" else "")


@contextlib.asynccontextmanager
async def nodes(backend: str, url: str, tmp_path: Path):
    """The `pulse serve` nodes on the store: two processes, or the app in this process for chdb (its data
    directory is one process's)."""
    if backend == "chdb":
        settings = Settings(data_dir=tmp_path / "node0", store=url, catalog_poll_s=0.05)
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server()
        try:
            yield [str(server.make_url("")).rstrip("/")]
        finally:
            await server.close()
        return
    servers = [Server(tmp_path / f"node{i}", "--store", url, log_path=tmp_path / f"node{i}.log") for i in range(2)]
    try:
        for server in servers:
            await server.start()
        yield [server.url for server in servers]
    finally:
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.stop(15)


def traffic(now: int, seed: int = 7) -> list[list[dict]]:
    """Batches of events over the last 20 hours (the newest 10 minutes old), each person's in time order:
    anonymous visitors some of whom identify, client session ids for some, gaps above and below 30 minutes."""
    rng = random.Random(seed)
    events = []
    for k in range(12):
        anon = f"anon{k}"
        ts = now - 20 * HOUR + rng.randrange(0, HOUR)
        keyed = k % 3 == 0
        for step in range(rng.randrange(2, 9)):
            ts += rng.choice([60_000, 5 * 60_000, 29 * 60_000, 31 * 60_000, 2 * HOUR])
            if ts > now - 10 * 60_000:
                break
            identified = k % 2 == 0 and step >= 2
            event = {"event": rng.choice(["page_view", "page_view", "click", "signup"]), "uuid": str(uuid.uuid4()),
                     "distinct_id": f"user{k}" if identified else anon,
                     "timestamp": datetime.fromtimestamp(ts / 1000, timezone.utc).isoformat()}
            if identified and step == 2:
                event["anon_id"] = anon
            if keyed:
                event["session_id"] = f"s{k}-{step // 3}"
            if event["event"] == "page_view":
                event["page_url"] = f"https://shop.example/{rng.choice(['a', 'b', 'c'])}"
            events.append((ts, event))
    events.sort(key=lambda pair: pair[0])
    ordered = [event for _, event in events]
    return [ordered[i:i + 7] for i in range(0, len(ordered), 7)]


def recount(batches: list[list[dict]]) -> dict:
    """Events, users and sessions as pulse defines them, counted here from what was sent."""
    events = [event for batch in batches for event in batch]
    person: dict[str, str] = {}
    keyless: dict[str, list[int]] = {}
    sessions: set = set()
    names: dict[str, list] = {}
    for event in events:
        ts = int(datetime.fromisoformat(event["timestamp"]).timestamp() * 1000)
        distinct = event["distinct_id"]
        if "anon_id" in event:
            person[distinct] = person.get(event["anon_id"], event["anon_id"])
        who = person.setdefault(distinct, distinct)
        if "session_id" in event:
            sessions.add(event["session_id"])
        else:
            times = keyless.setdefault(who, [])
            if not times or ts - times[-1] > GAP:
                sessions.add((who, ts))
            times.append(ts)
        found = names.setdefault(event["event"], [0, set()])
        found[0] += 1
        found[1].add(who)
    return {"events": len(events), "unique_users": len({person[e["distinct_id"]] for e in events}),
            "sessions": len(sessions),
            "top": sorted(([name, n, len(users)] for name, (n, users) in names.items()), key=lambda r: (-r[1], r[0]))}


async def send(session: aiohttp.ClientSession, url: str, key: str, batch: list[dict]) -> tuple[int, dict]:
    async with session.post(f"{url}/api/v1/events/ingest", json={"events": batch},
                            headers={"X-API-Key": key, "User-Agent": UA}) as response:
        return response.status, await response.json()


async def read(session: aiohttp.ClientSession, url: str, project: int, token: str, endpoint: str,
               **params: str) -> tuple[int, dict]:
    async with session.get(f"{url}/api/v1/projects/{project}/{endpoint}", params=params,
                           headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


async def answers(session, url, project, token, window) -> dict:
    found = {}
    for endpoint, extra in (("overview", {}), ("timeseries", {"interval": "hour"}), ("top-events", {})):
        status, body = await read(session, url, project, token, endpoint, **window, **extra)
        assert status == 200, body
        found[endpoint] = body
    return found


async def sqlite_reference(tmp_path: Path, batches: list[list[dict]], ask) -> dict:
    """What a `pulse serve` on SQLite answers for the same batches: `ask(session, url, project)` (project: the
    `projects create --json` answer) asks it."""
    data_dir = tmp_path / "sqlite"
    project = json.loads(pulse("projects", "create", "shop", "--json", data_dir=data_dir).stdout)
    server = Server(data_dir, log_path=tmp_path / "sqlite.log")
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for batch in batches:
                assert (await send(session, server.url, project["ingest_key"], batch))[0] == 202
            return await ask(session, server.url, project)
    finally:
        server.stop(15)


async def sqlite_answers(tmp_path: Path, batches: list[list[dict]], window: dict) -> dict:
    return await sqlite_reference(tmp_path, batches, lambda session, url, project: answers(
        session, url, project["id"], project["read_token"], window))


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_ingest_and_reads_match_a_recount_and_the_sqlite_store(backend, clickhouse, tmp_path):
    url = _store_url(backend, clickhouse, tmp_path)
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        project, ingest_key, read_token = await store.create_project("shop")
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    batches = traffic(now)
    window = {"from": datetime.fromtimestamp((now - 24 * HOUR) / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
              "to": datetime.fromtimestamp(now / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for i, batch in enumerate(batches):
            status, body = await send(session, urls[i % len(urls)], ingest_key, batch)
            assert (status, body) == (202, {"accepted": len(batch), "duplicates": 0})
        # a batch answered once, sent again to another node: counted once
        status, body = await send(session, urls[-1], ingest_key, batches[0])
        assert (status, body) == (202, {"accepted": 0, "duplicates": len(batches[0])})
        found = [await answers(session, u, project.id, read_token, window) for u in urls]
    expected = recount(batches)
    overview = found[0]["overview"]
    assert (overview["events"], overview["unique_users"], overview["sessions"]) == (
        expected["events"], expected["unique_users"], expected["sessions"])
    assert [[r["value"], r["count"], r["unique_users"]] for r in found[0]["top-events"]["rows"]] == expected["top"]
    buckets = found[0]["timeseries"]["buckets"]
    assert sum(b["events"] for b in buckets) == expected["events"]
    assert all(answer == found[0] for answer in found)  # every node answers alike
    reference = await sqlite_answers(tmp_path, batches, window)
    for endpoint in ("overview", "timeseries", "top-events"):
        mine = {k: v for k, v in found[0][endpoint].items() if k != "project"}
        theirs = {k: v for k, v in reference[endpoint].items() if k != "project"}
        assert mine == theirs, endpoint


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_rotated_key_reaches_every_node_and_bad_input_is_refused(backend, clickhouse, tmp_path):
    url = _store_url(backend, clickhouse, tmp_path)
    settings = Settings(data_dir=tmp_path / "cli", store=url)
    async with open_store(settings, serve=False) as store:
        project, ingest_key, read_token = await store.create_project("shop")
    event = [{"event": "page_view", "distinct_id": "u1", "page_url": "https://shop.example/"}]
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        assert (await send(session, urls[-1], ingest_key, event))[0] == 202
        if backend == "chdb":  # the store is this process's: rotate through the node's own catalog
            return
        async with open_store(settings, serve=False) as store:
            new_key = await store.rotate_key(project, "ingest")
        statuses = None
        for _ in range(200):  # each node polls the catalog's version; a bounded wait, not a timing assertion
            statuses = [(await send(session, u, new_key, event))[0] for u in urls]
            statuses += [(await send(session, u, ingest_key, event))[0] for u in urls]
            if statuses == [202] * len(urls) + [401] * len(urls):
                break
            await asyncio.sleep(0.05)
        assert statuses == [202] * len(urls) + [401] * len(urls)
        status, body = await send(session, urls[0], new_key, [{"event": ""}])
        assert status == 400 and body["field"] == "events[0].event"
