"""The live feed over a real WebSocket: committed events in order, drops reported, tokens enforced. On both stores
(`store_backend`); on the ClickHouse cluster the client watches one `pulse serve` node and the events are posted
to the other, unless a test says otherwise."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest

from pulse.protocol import LiveDropped, LiveEvents, LiveHello, live_decoder
from pulse.storage.sqlite.projects import get_project, rotate_key
from tests.conftest import event

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")


WATCHED, OTHER = {"at": 0}, {"at": 1}  # on the cluster: the node a client watches, the node events go to


def on(client, node: dict) -> dict:
    """`node` as a request's keyword on the cluster's nodes; nothing for the app in this process."""
    return node if hasattr(client, "urls") else {}


async def post(client, project, events, **node):
    response = await client.post("/api/v1/events/ingest", json={"events": events},
                                 headers={"X-API-Key": project.ingest_key, "User-Agent": CHROME}, **node)
    assert response.status == 202
    return await response.json()


async def receive_events(ws, count: int, timeout: float = 10.0) -> tuple[list, int]:
    """Read messages until `count` events (plus reported drops) have arrived."""
    events, dropped = [], 0
    while len(events) + dropped < count:
        message = live_decoder.decode(await asyncio.wait_for(ws.receive_str(), timeout))
        if isinstance(message, LiveEvents):
            events.extend(message.events)
        elif isinstance(message, LiveDropped):
            dropped += message.count
    return events, dropped


async def connect(client, project, **params):
    ws = await client.ws_connect(f"/api/v1/ws/events/{project.id}", params={"token": project.read_token, **params},
                                 **on(client, WATCHED))
    hello = live_decoder.decode(await ws.receive_str())
    assert isinstance(hello, LiveHello) and hello.project == project.id
    return ws


@pytest.fixture
async def served(store_backend):
    """The store, the server on it and a project: (backend, client, project)."""
    project = await store_backend.project("site", domain="site.example")
    return store_backend, await store_backend.client(), project


async def test_client_sees_events_committed_after_it_connected_in_order(served):
    _, client, project = served
    await post(client, project, [event("before", distinct_id="u0")], **on(client, WATCHED))
    ws = await connect(client, project)
    names = [f"e{i}" for i in range(30)]
    for start in range(0, 30, 10):
        await post(client, project, [
            event(name, distinct_id=f"u{i}", page_url=f"https://site.example/p{i}", properties={"i": i})
            for i, name in enumerate(names[start:start + 10], start)
        ], **on(client, OTHER))
    received, dropped = await receive_events(ws, 30)
    assert dropped == 0
    assert [e.event for e in received] == names
    first = received[0]
    assert (first.distinct_id, first.path, first.browser, first.os, first.device) == (
        "u0", "/p0", "Chrome", "Windows", "desktop")
    assert first.properties == {"i": 0}
    await ws.close()


async def test_event_filter(served):
    _, client, project = served
    ws = await connect(client, project, event="signup")
    await post(client, project, [event("page_view"), event("signup", distinct_id="a"), event("click")],
               **on(client, OTHER))
    await post(client, project, [event("signup", distinct_id="b")], **on(client, OTHER))
    received, _ = await receive_events(ws, 2)
    assert [(e.event, e.distinct_id) for e in received] == [("signup", "a"), ("signup", "b")]
    await ws.close()


async def test_wrong_tokens_are_refused(store_backend):
    project = await store_backend.project("site", domain="site.example")
    other = await store_backend.project("other")
    client = await store_backend.client()
    url = f"/api/v1/ws/events/{project.id}"
    for token, status in [("sk_nope", 401), (project.ingest_key, 403), (other.read_token, 403)]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(url, params={"token": token})
        assert refused.value.status == status
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await client.ws_connect(url)


async def test_stalled_client_does_not_hold_up_ingest_and_is_told_of_drops(store_backend):
    """On the cluster the batches go to each node in turn: the client's own node's and the other's all count."""
    project = await store_backend.project("site", domain="site.example")
    client = await store_backend.client(replace(store_backend.settings, live_buffer_events=50))
    stalled = await connect(client, project)  # connected, then never read while events pour in
    total = 0
    for batch in range(40):
        result = await post(client, project, [event("tick", properties={"pad": "x" * 900}) for _ in range(250)])
        total += result["accepted"]
    assert total == 10_000  # every batch was committed while the client read nothing
    received, dropped = await receive_events(stalled, total, timeout=20)
    assert dropped > 0
    assert len(received) + dropped == total
    await stalled.close()


async def test_rotating_the_read_token_closes_its_feeds(served):
    backend, client, project = served
    ws = await connect(client, project)
    if backend.sqlite:
        rotate_key(backend.db, get_project(backend.db, project.id), "read")
    else:  # through another process's store, as `pulse keys rotate` does
        async with backend.store() as store:
            await store.rotate_key(await store.get_project(project.id), "read")
    message = await asyncio.wait_for(ws.receive(), 5)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4001
