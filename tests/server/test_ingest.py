"""POST /api/v1/events/ingest against the real app and a real database file, and (`store_backend`) against two
`pulse serve` nodes on a two-shard ClickHouse cluster: what the SQLite file shows is read there through the
store's own API."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from datetime import datetime

import pytest

from pulse.protocol import MAX_EVENTS_PER_BATCH, MAX_NAME, MAX_PROPERTIES, MAX_URL
from pulse.storage.sqlite.connection import connect
from tests.conftest import event, read, recount

INGEST = "/api/v1/events/ingest"


async def post(client, key, events, **extra):
    return await client.post(INGEST, json={"events": events, **extra}, headers={"X-API-Key": key})


@pytest.fixture
async def served(store_backend):
    """The store, the server on it and a project: (backend, client, project)."""
    project = await store_backend.project("site", domain="site.example")
    return store_backend, await store_backend.client(), project


def epoch_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


async def test_accepts_batch_after_commit(served):
    backend, client, project = served
    response = await post(client, project.ingest_key, [event(distinct_id="u1"), event("click", distinct_id="u2")])
    assert response.status == 202
    assert await response.json() == {"accepted": 2, "duplicates": 0}
    # the 202 came after the commit: a separate connection sees the rows now
    if backend.sqlite:
        assert backend.db.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    else:
        assert await backend.count(project) == 2


async def test_key_in_query_string_and_text_plain_body(served):
    _, client, project = served
    body = json.dumps({"events": [event(distinct_id="u1")]})
    response = await client.post(f"{INGEST}?key={project.ingest_key}", data=body,
                                 headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert response.status == 202


async def test_retried_batch_is_not_counted_twice(served):
    backend, client, project = served
    events = [event(distinct_id="u1", session_id="s1"), event("click", distinct_id="u1", session_id="s1")]
    first = await post(client, project.ingest_key, events)
    second = await post(client, project.ingest_key, events)
    assert await first.json() == {"accepted": 2, "duplicates": 0}
    assert await second.json() == {"accepted": 0, "duplicates": 2}
    if backend.sqlite:
        assert recount(backend.db, project.id)["events"] == 2
    else:
        assert await backend.count(project) == 2


async def test_missing_uuid_is_generated(served):
    backend, client, project = served
    response = await post(client, project.ingest_key, [{"event": "click"}, {"event": "click"}])
    assert await response.json() == {"accepted": 2, "duplicates": 0}
    if backend.sqlite:
        uuids = [r[0] for r in backend.db.execute("SELECT uuid FROM events")]
        assert len(set(uuids)) == 2 and all(len(u) == 16 for u in uuids)
    else:
        uuids = [uuid.UUID(row["uuid"]) for row in await backend.exported(project)]
        assert len(set(uuids)) == 2


async def test_timestamps_iso_epoch_and_clock_skew(served):
    backend, client, project = served
    events = [
        event("a", timestamp="2026-02-10T12:00:00Z"),
        event("b", timestamp=1770724800000),  # the same instant in epoch ms
    ]
    # the client clock is 60 s behind the server: its timestamps are moved forward by the difference
    before = int(time.time() * 1000)
    response = await post(client, project.ingest_key, events, sent_at="2026-02-10T12:00:00Z")
    assert response.status == 202
    after = int(time.time() * 1000)
    if backend.sqlite:
        rows = backend.db.execute("SELECT ts, received FROM events").fetchall()
        for ts, received in rows:
            assert ts == 1770724800000 + (received - 1770724800000)  # == received: sent at the event time
    else:  # the time of receipt is not kept there: it lies between the request's start and its answer
        stamps = [epoch_ms(row["timestamp"]) for row in await backend.exported(project)]
        assert len(stamps) == 2 and all(before <= ts <= after for ts in stamps)

    response = await post(client, project.ingest_key, [event("c", timestamp="2026-02-10T12:00:00Z")])
    if backend.sqlite:
        ts = backend.db.execute(
            "SELECT e.ts FROM events e JOIN strings s ON s.id = e.name_id WHERE s.value = 'c'").fetchone()[0]
    else:
        ts = next(epoch_ms(row["timestamp"]) for row in await backend.exported(project) if row["event"] == "c")
    assert ts == 1770724800000  # without sent_at the timestamp is kept


async def test_raw_ip_is_never_stored(client, project, db, settings):
    await post(client, project.ingest_key, [event()])
    raw = settings.db_path.read_bytes() + settings.db_path.with_name("pulse.db-wal").read_bytes()
    assert b"127.0.0.1" not in raw
    assert len(db.execute("SELECT ip_hash FROM events").fetchone()[0]) == 8


@pytest.mark.parametrize(
    "events, field, index",
    [
        ([event(), {"uuid": str(uuid.uuid4())}], "events[1]", 1),
        ([event("x" * (MAX_NAME + 1))], "events[0].event", 0),
        ([event(), event(), event(distinct_id="")], "events[2].distinct_id", 2),
        ([event(page_url="https://a/" + "x" * MAX_URL)], "events[0].page_url", 0),
        ([event(properties={f"k{i}": i for i in range(MAX_PROPERTIES + 1)})], "events[0].properties", 0),
        ([event(properties={"k": "v" * 2000})], "events[0].properties[...]", 0),
        ([event(properties={"nested": {"a": 1}})], "events[0].properties[...]", 0),
        ([event(timestamp="yesterday")], "events[0].timestamp", 0),
        ([event(uuid="not-a-uuid")], "events[0].uuid", 0),
        ([event(colour="red")], "events[0]", 0),
        ([event()] * (MAX_EVENTS_PER_BATCH + 1), "events", None),
        ([], "events", None),
    ],
)
async def test_each_limit_is_a_400_naming_field_and_index(served, events, field, index):
    backend, client, project = served
    response = await post(client, project.ingest_key, events)
    assert response.status == 400
    body = await response.json()
    assert body["field"] == field
    assert body.get("index") == index
    assert body["error"].startswith(field)
    if backend.sqlite:
        assert backend.db.execute("SELECT count(*) FROM events").fetchone()[0] == 0  # nothing of the batch is stored
    else:
        assert await backend.count(project) == 0


async def test_malformed_json_and_oversized_body(served):
    _, client, project = served
    response = await client.post(INGEST, data=b"{not json", headers={"X-API-Key": project.ingest_key})
    assert response.status == 400
    assert (await response.json())["field"] == "body"
    response = await client.post(INGEST, data=b"\xff\xfe", headers={"X-API-Key": project.ingest_key})
    assert response.status == 400
    big = json.dumps({"events": [event(properties={"p": "x" * 1000})] * 1000}).encode()
    response = await client.post(INGEST, data=io.BytesIO(big), headers={"X-API-Key": project.ingest_key})
    assert response.status == 413
    assert (await response.json())["field"] == "body"


async def test_concurrent_posters_are_all_counted(served):
    backend, client, project = served

    async def poster(worker: int) -> int:
        sent = 0
        for batch in range(10):
            events = [event(distinct_id=f"w{worker}-u{i % 3}", session_id=f"w{worker}-s{batch}") for i in range(5)]
            response = await post(client, project.ingest_key, events)
            assert response.status == 202
            sent += (await response.json())["accepted"]
        return sent

    sent = sum(await asyncio.gather(*(poster(w) for w in range(40))))
    assert sent == 2000
    if backend.sqlite:
        assert recount(backend.db, project.id) == {"events": 2000, "unique_users": 120, "sessions": 400}
    else:  # every event is of now: the last 24 hours hold them all
        overview = await read(client, project, "overview")
        assert {k: overview[k] for k in ("events", "unique_users", "sessions")} == {
            "events": 2000, "unique_users": 120, "sessions": 400}
        assert await backend.count(project) == 2000
        assert await backend.verify() == []


async def test_full_queue_answers_503_with_retry_after(aiohttp_client, settings, project):
    from dataclasses import replace

    from pulse.server.app import create_app

    client = await aiohttp_client(create_app(replace(settings, queue_max_events=1000)))
    blocker = connect(settings.db_path)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the writer waits, the queue fills
    try:
        first = asyncio.create_task(post(client, project.ingest_key, [event(distinct_id=f"u{i}") for i in range(600)]))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(post(client, project.ingest_key, [event(distinct_id="x")] * 1))
        third = await post(client, project.ingest_key, [event(distinct_id=f"v{i}") for i in range(600)])
        assert third.status == 503
        assert third.headers["Retry-After"] == "1"
        assert "queue is full" in (await third.json())["error"]
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert (await first).status == 202
    assert (await second).status == 202


async def test_cors_preflight_and_headers(served):
    _, client, project = served
    response = await client.options(INGEST, headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-api-key",
    })
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-API-Key" in response.headers["Access-Control-Allow-Headers"]
    response = await post(client, project.ingest_key, [event()])
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_health_needs_no_key(served):
    _, client, _ = served
    response = await client.get("/health")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_unknown_route_is_json_404(served):
    _, client, _ = served
    response = await client.get("/api/v1/nothing")
    assert response.status == 404
    assert (await response.json())["error"] == "Not Found"
