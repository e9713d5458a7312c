"""The live feed across `pulse serve` nodes sharing a ClickHouse store (one server, and a two-shard cluster):
a WebSocket client of node A, speaking the TUI's protocol, gets the events posted to node B as well as A's
own, each once."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from pulse.config import Settings
from pulse.protocol import LiveEvents, LiveHello, live_decoder
from pulse.storage.base import open_store
from tests.clickhouse.test_store_core import _store_url, clickhouse, nodes, send  # noqa: F401 (the servers)
from tests.clickhouse_servers import MISSING

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

RECEIVE_TIMEOUT_S = 20.0  # a bound so a broken feed fails rather than hangs


async def receive(ws, count: int) -> list:
    events = []
    while len(events) < count:
        message = live_decoder.decode(await asyncio.wait_for(ws.receive_str(), RECEIVE_TIMEOUT_S))
        if isinstance(message, LiveEvents):
            events.extend(message.events)
    return events


@pytest.mark.parametrize("backend", ["single", "cluster"])
async def test_a_client_of_one_node_sees_events_posted_to_another(backend, clickhouse, tmp_path):
    url = _store_url(backend, clickhouse, tmp_path)
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        project, ingest_key, read_token = await store.create_project("shop")
    async with nodes(backend, url, tmp_path) as (node_a, node_b), aiohttp.ClientSession() as session:
        before = [{"event": "before", "distinct_id": "u0"}]
        assert (await send(session, node_b, ingest_key, before))[0] == 202
        await asyncio.sleep(1.0)  # committed well before the client comes: not sent to it
        ws = await session.ws_connect(f"{node_a}/api/v1/ws/events/{project.id}",
                                      protocols=("pulse.bearer", read_token))
        assert isinstance(live_decoder.decode(await ws.receive_str()), LiveHello)
        for i in range(4):
            node = node_b if i % 2 == 0 else node_a
            batch = [{"event": f"e{i}", "distinct_id": f"u{i}", "page_url": f"https://shop.example/p{i}",
                      "properties": {"i": i}}]
            assert (await send(session, node, ingest_key, batch))[0] == 202
        received = await receive(ws, 4)
        assert sorted(e.event for e in received) == ["e0", "e1", "e2", "e3"]
        from_b = next(e for e in received if e.event == "e0")
        assert (from_b.distinct_id, from_b.path, from_b.browser, from_b.os, from_b.device) == (
            "u0", "/p0", "Firefox", "Linux", "desktop")
        assert from_b.properties == {"i": 0}
        # nothing twice: the next event to arrive is the next one posted
        assert (await send(session, node_b, ingest_key, [{"event": "last", "distinct_id": "u9"}]))[0] == 202
        assert [e.event for e in await receive(ws, 1)] == ["last"]
        await ws.close()
