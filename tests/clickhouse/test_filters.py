"""prop., trait. and utm_ filters, alone and together, on the ClickHouse store's overview, timeseries and top
events (one 18.16 server, a two-shard cluster behind two nodes, chdb): each equals the SQLite store's answer for
the same events, and the events counted equal a recount in plain Python; a key SQLite cannot name is a 501."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest

from pulse.config import Settings
from pulse.storage.base import open_store
from tests.clickhouse.test_lists import FILTERS, MINUTE, ask, recount, text, traffic
from tests.clickhouse.test_store_core import _store_url, clickhouse, nodes, read, send, sqlite_reference  # noqa: F401
from tests.clickhouse_servers import MISSING

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


async def answers(session, url, project, token, window) -> dict:
    found = {}
    for filters in FILTERS:
        for endpoint, extra in (("overview", {}), ("timeseries", {"interval": "hour"}), ("top-events", {})):
            found[f"{endpoint} {json.dumps(filters)}"] = await ask(session, url, project, token, window, endpoint,
                                                                   **filters, **extra)
    return found


async def sqlite_answers(tmp_path: Path, batches, window) -> dict:
    return await sqlite_reference(tmp_path, batches, lambda session, url, project: answers(
        session, url, project["id"], project["read_token"], window))


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_filters_match_a_recount_and_the_sqlite_store(backend, clickhouse, tmp_path):  # noqa: F811
    url = _store_url(backend, clickhouse, tmp_path)
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        project, ingest_key, read_token = await store.create_project("shop")
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    batches = traffic(now)
    start = now - 6 * 60 * MINUTE
    window = {"from": datetime.fromtimestamp(start / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
              "to": datetime.fromtimestamp(now / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for i, batch in enumerate(batches):
            assert (await send(session, urls[i % len(urls)], ingest_key, batch))[0] == 202
        found = await answers(session, urls[0], project.id, read_token, window)
        status, body = await read(session, urls[-1], project.id, read_token, "timeseries", **window,
                                  **{"trait.a\"b": "1"})
        assert status == 501, body
    bounds = [int(datetime.fromisoformat(window[k] + "+00:00").timestamp() * 1000) for k in ("from", "to")]
    expected = recount(batches, tuple(bounds))
    for filters in FILTERS:
        if any(k.startswith("utm") for k in filters):
            continue
        kept = [(e, who) for e, who in expected["rows"]
                if all(text((e.get("properties") or {}).get(k[5:])) == v for k, v in filters.items()
                       if k.startswith("prop."))
                and all(text(expected["traits"].get(who, {}).get(k[6:])) == v for k, v in filters.items()
                        if k.startswith("trait."))]
        key = json.dumps(filters)
        assert found[f"overview {key}"]["events"] == len(kept), key
        assert sum(b["events"] for b in found[f"timeseries {key}"]["buckets"]) == len(kept), key
    assert found['overview {"utm_source": "news"}']["events"] > 0
    reference = await sqlite_answers(tmp_path, batches, window)
    for key in reference:
        assert found[key] == reference[key], key
