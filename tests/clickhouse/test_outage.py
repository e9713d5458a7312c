"""A ClickHouse server that goes away: each node answers 503 with a Retry-After, at once and in JSON, to a batch
(nothing of it acknowledged) and to a question, rather than a 500 or a wait without end."""

from __future__ import annotations

import aiohttp
import pytest

from pulse.config import Settings
from pulse.storage.base import open_store
from tests.clickhouse.test_store_core import nodes, read, send
from tests.clickhouse_servers import MISSING, start_servers, stop_servers

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


async def test_a_dead_clickhouse_is_a_503_for_batches_and_questions(tmp_path):
    servers = start_servers(tmp_path / "ch", 1)
    try:
        url = f"clickhouse://127.0.0.1:{servers[0].http_port}/outage"
        async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
            project, ingest_key, read_token = await store.create_project("shop")
        async with nodes("single", url, tmp_path) as urls, aiohttp.ClientSession() as session:
            status, _ = await send(session, urls[0], ingest_key, [{"event": "page_view", "distinct_id": "a"}])
            assert status == 202
            status, body = await read(session, urls[0], project.id, read_token, "overview", range="24h")
            assert status == 200 and body["events"] == 1
            stop_servers(servers)
            status, body = await send(session, urls[1], ingest_key, [{"event": "page_view", "distinct_id": "b"}])
            assert status == 503 and body["error"], body
            for endpoint in ("overview", "top-events", "browsers", "funnel"):
                params = {"steps": "page_view,signup"} if endpoint == "funnel" else {}
                async with session.get(f"{urls[0]}/api/v1/projects/{project.id}/{endpoint}",
                                       params={"range": "24h", **params},
                                       headers={"Authorization": f"Bearer {read_token}"}) as response:
                    body = await response.json()
                    assert response.status == 503, (endpoint, body)
                    assert response.headers["Retry-After"] == "5" and "ClickHouse" in body["error"], body
    finally:
        stop_servers(servers)
