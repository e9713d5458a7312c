"""Abuse resistance: rate limits, allowed origins, slow bodies, header limits, metrics, long queries."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re

import pytest

from pulse.server.app import create_app
from pulse.storage.sqlite.projects import get_project, update_project
from tests.conftest import event

INGEST = "/api/v1/events/ingest"


async def test_per_ip_rate_limit_answers_429_with_retry_after(aiohttp_client, settings, project):
    limited = dataclasses.replace(settings, rate_per_ip=2.0, burst_per_ip=3.0, trust_proxy=True)
    client = await aiohttp_client(create_app(limited))
    statuses = []
    for _ in range(6):
        response = await client.post(INGEST, json={"events": [event()]},
                                     headers={"X-API-Key": project.ingest_key, "X-Forwarded-For": "203.0.113.7"})
        statuses.append(response.status)
    assert statuses[:3] == [202, 202, 202] and set(statuses[3:]) == {429}
    assert int(response.headers["Retry-After"]) >= 1
    assert "too many requests" in (await response.json())["error"]
    other = await client.post(INGEST, json={"events": [event()]},
                              headers={"X-API-Key": project.ingest_key, "X-Forwarded-For": "198.51.100.1"})
    assert other.status == 202  # another address has its own bucket
    local = await client.post(INGEST, json={"events": [event()]}, headers={"X-API-Key": project.ingest_key})
    assert local.status == 202  # loopback: the operator's own tools are not limited per address


async def test_per_key_rate_limit(aiohttp_client, settings, project):
    limited = dataclasses.replace(settings, rate_per_key=1.0, burst_per_key=2.0)
    client = await aiohttp_client(create_app(limited))
    statuses = [(await client.post(INGEST, json={"events": [event()]}, headers={"X-API-Key": project.ingest_key})).status
                for _ in range(4)]
    assert statuses == [202, 202, 429, 429]
    stored = await client.get(f"/api/v1/projects/{project.id}/overview",
                              headers={"Authorization": f"Bearer {project.read_token}"})
    assert (await stored.json())["events"] == 2  # nothing of a refused batch was kept


async def test_allowed_origins_refuse_browsers_from_elsewhere(client, project, db):
    update_project(db, get_project(db, project.id), allowed_origins="site.example")
    await asyncio.sleep(0.2)  # the server reloads the catalog
    for origin, status in [("https://site.example", 202), ("https://www.site.example", 202),
                           ("https://evil.example", 403), ("https://site.example.evil.com", 403), (None, 202)]:
        headers = {"X-API-Key": project.ingest_key} | ({"Origin": origin} if origin else {})
        response = await client.post(INGEST, json={"events": [event()]}, headers=headers)
        assert response.status == status, origin
        if status == 403:
            assert "may not send events" in (await response.json())["error"]


async def test_a_body_that_never_arrives_is_cut_off(aiohttp_server, settings, project):
    slow = dataclasses.replace(settings, body_timeout_s=0.3)
    server = await aiohttp_server(create_app(slow))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nX-API-Key: {project.ingest_key}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"events\": [".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_oversized_headers_are_refused(client, project):
    response = await client.post(INGEST, json={"events": [event()]},
                                 headers={"X-API-Key": project.ingest_key, "X-Big": "a" * 20_000})
    assert response.status in (400, 431)


async def test_metrics_count_requests_events_and_the_writer(client, project):
    for _ in range(3):
        await client.post(INGEST, json={"events": [event(), event()]}, headers={"X-API-Key": project.ingest_key})
    await client.post(INGEST, json={"events": [{"event": 5}]}, headers={"X-API-Key": project.ingest_key})
    await client.post(INGEST, json={"events": [event()]}, headers={"X-API-Key": "pk_wrong"})
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    values = dict(re.findall(r"^(pulse_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    assert values["pulse_events_accepted_total"] == "6"
    assert values['pulse_ingest_rejected_requests_total{status="400"}'] == "1"
    assert values['pulse_ingest_rejected_requests_total{status="401"}'] == "1"
    assert values['pulse_http_requests_total{status="202"}'] == "3"
    assert int(values['pulse_commit_seconds_bucket{le="+Inf"}']) >= 1
    assert values["pulse_live_clients"] == "0" and values["pulse_queue_events"] == "0"
    forwarded = await client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert forwarded.status == 403  # through a proxy: not this host


async def test_request_log_lines_never_hold_keys(client, project, caplog):
    caplog.set_level(logging.DEBUG, logger="pulse.access")
    await client.post(f"{INGEST}?key={project.ingest_key}", json={"events": [event()]})
    await client.get(f"/api/v1/projects/{project.id}/overview?token={project.read_token}")
    await client.get(f"/api/v1/projects/{project.id}/overview", headers={"Authorization": "Bearer sk_nope"})
    records = [r for r in caplog.records if r.name == "pulse.access"]
    assert [r.fields["status"] for r in records] == [202, 200, 401]
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG, logging.INFO]
    text = " ".join(str(r.fields) for r in records)
    assert project.ingest_key not in text and project.read_token not in text and "sk_nope" not in text


@pytest.mark.parametrize("timeout", [1e-6])
async def test_a_query_past_its_time_limit_is_a_503(aiohttp_client, settings, project, timeout):
    slow = dataclasses.replace(settings, query_timeout_s=timeout)
    client = await aiohttp_client(create_app(slow))
    events = [event(distinct_id=f"u{i}", properties={"n": i}) for i in range(500)]
    assert (await client.post(INGEST, json={"events": events}, headers={"X-API-Key": project.ingest_key})).status == 202
    response = await client.get(f"/api/v1/projects/{project.id}/properties/n?range=24h",
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 503 and response.headers["Retry-After"] == "10"
    assert "narrow the range" in (await response.json())["error"]


async def test_slow_loris_headers_are_cut_off(aiohttp_server, settings):
    """A client trickling its request head a byte at a time is disconnected before it can finish it."""
    quick = dataclasses.replace(settings, keepalive_timeout_s=0.5)
    server = await aiohttp_server(create_app(quick))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = b"POST /api/v1/events/ingest HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    sent = 0
    for byte in head:
        writer.write(bytes([byte]))
        sent += 1
        await asyncio.sleep(0.05)
        if reader.at_eof():
            break
        try:
            await asyncio.wait_for(reader.read(1), timeout=0.001)
        except asyncio.TimeoutError:
            continue
        break  # the server closed the connection (or answered)
    writer.close()
    assert sent < len(head), "the server let the whole trickled head through"
