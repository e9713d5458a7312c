"""Hostile input and careless operators: bodies that lie about their encoding, times far from now,
files others could read, and a second server led to a served database by a symlink."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
import zlib

import aiohttp
import pytest

from pulse.server.app import create_app
from tests.conftest import event
from tests.servers import Server, free_port, pulse

INGEST = "/api/v1/events/ingest"
BOMB = gzip.compress(b'{"events": [' + b" " * (8 * 1024 * 1024) + b"]}")  # 8 KiB that inflate to 8 MiB
NOT_GZIP = b'{"events": [{"event": "page_view"}]}'  # plain JSON, labelled gzip
BROKEN_GZIP = gzip.compress(NOT_GZIP)[:12] + b"\x00" * 40  # a gzip header, then garbage
NOT_DEFLATE = b"\x78\x9c" + b"\xff" * 40  # a zlib header, then garbage


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
async def quiet_client(aiohttp_client, settings, project):
    """The app without the start-up warm-up, whose log line would mix with the ones a test looks at."""
    return await aiohttp_client(create_app(dataclasses.replace(settings, warm_days=0)))


async def post_encoded(client, key: str, body: bytes, encoding: str):
    return await client.post(INGEST, data=body, headers={"X-API-Key": key, "Content-Encoding": encoding,
                                                         "Content-Type": "application/json"})


@pytest.mark.parametrize("body, encoding", [(NOT_GZIP, "gzip"), (BROKEN_GZIP, "gzip"), (NOT_DEFLATE, "deflate")])
async def test_a_body_that_is_not_its_content_encoding_is_a_400_logged_in_one_line(quiet_client, project, db,
                                                                                  caplog, body, encoding):
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    response = await post_encoded(quiet_client, project.ingest_key, body, encoding)
    assert response.status == 400
    assert await response.json() == {"error": f"body is not valid {encoding} (its Content-Encoding)",
                                     "field": "body"}
    assert (await quiet_client.get("/health")).status == 200  # the server is done with the bad request
    # (aiohttp.access: the test server's own access log, which `pulse serve` turns off)
    lines = [(r.name, r.levelname) for r in caplog.records if r.levelno >= logging.INFO and r.name != "aiohttp.access"]
    assert lines == [("pulse.access", "INFO")]
    assert not any(r.exc_info for r in caplog.records)
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0

    good = await post_encoded(quiet_client, project.ingest_key, gzip.compress(NOT_GZIP), "gzip")
    assert good.status == 202  # a real gzip body is read as before
    deflated = await post_encoded(quiet_client, project.ingest_key, zlib.compress(NOT_GZIP), "deflate")
    assert deflated.status == 202
    bomb = await post_encoded(quiet_client, project.ingest_key, BOMB, "gzip")
    assert bomb.status == 413 and (await bomb.json())["field"] == "body"  # inflated past the body limit
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 2


@pytest.mark.parametrize("batch, field, index", [
    ({"events": [event()], "sent_at": "9999-12-31T23:59:59Z"}, "sent_at", None),
    ({"events": [event()], "sent_at": "0001-01-01T00:00:00Z"}, "sent_at", None),
    ({"events": [event(), event(timestamp="9999-12-31T23:59:59Z")]}, "events[1].timestamp", 1),
    ({"events": [event(), event(timestamp="0001-01-01T00:00:00+01:00")]}, "events[1].timestamp", 1),
    ({"events": [event(timestamp="1969-12-31T23:59:59Z")], "sent_at": 1_000}, "events[0].timestamp", 0),
])
async def test_a_time_outside_1970_to_3000_is_a_400_naming_it(client, project, db, batch, field, index):
    response = await client.post(INGEST, json=batch, headers={"X-API-Key": project.ingest_key})
    assert response.status == 400
    body = await response.json()
    assert body.get("field") == field and body.get("index") == index
    assert body["error"].startswith(f"{field}: Expected a time from 1970")
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0  # nothing of the batch is stored


async def test_a_time_corrected_to_before_2000_is_the_time_of_receipt_and_read_back(client, project, db):
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # a clock near the year 3000 at sending: the correction would move the event back a thousand years
    response = await client.post(INGEST, json={"events": [event("far_sent", timestamp=now)],
                                               "sent_at": "2999-12-31T00:00:00Z"},
                                 headers={"X-API-Key": project.ingest_key})
    assert response.status == 202
    response = await client.post(INGEST, json={"events": [event("old", timestamp="1990-06-01T00:00:00Z")]},
                                 headers={"X-API-Key": project.ingest_key})
    assert response.status == 202
    rows = db.execute("SELECT e.ts, e.received FROM events e").fetchall()
    assert len(rows) == 2 and all(ts == received for ts, received in rows)
    overview = await client.get(f"/api/v1/projects/{project.id}/overview", params={"range": "24h"},
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert overview.status == 200
    assert (await overview.json())["events"] == 2


# -- a real `pulse serve` ----------------------------------------------------------------------------


def create_project(data_dir) -> dict:
    return json.loads(pulse("projects", "create", "site", "--json", data_dir=data_dir).stdout)


async def send(server: Server, key: str, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}{INGEST}", headers={"X-API-Key": key}, json={"events": [
                {"event": "page_view", "uuid": str(uuid.uuid4()), "distinct_id": f"u{i % 3}", "session_id": f"s{i}"}
                for i in range(count)]}) as response:
            assert response.status == 202


@pytest.mark.slow
async def test_bad_bodies_leave_no_traceback_in_the_servers_log(tmp_path):
    data_dir = tmp_path / "data"
    key = create_project(data_dir)["ingest_key"]
    server = Server(data_dir)
    await server.start()
    try:
        seen = []
        for body, encoding, api_key in [(NOT_GZIP, "gzip", key), (NOT_DEFLATE, "deflate", key),
                                        (BROKEN_GZIP, "gzip", "pk_unknown"), (BOMB, "gzip", key)]:
            # a connection each: a request whose body does not decode ends its connection
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                async with session.post(f"{server.url}{INGEST}", data=body, headers={
                        "X-API-Key": api_key, "Content-Encoding": encoding}) as response:
                    seen.append((response.status, (await response.json()).get("field")))
        assert seen == [(400, "body"), (400, "body"), (401, None), (413, "body")]
        await send(server, key, 1)  # and the server goes on
    finally:
        assert server.stop(signal.SIGTERM) == 0
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["level"] in ("error", "critical") or "error" in line]
    assert "Traceback" not in (tmp_path / "server.log").read_text()


@pytest.mark.slow
async def test_the_data_directory_database_and_backups_are_the_owners_alone(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # made by the operator, readable by all
    umask = os.umask(0o022)
    try:
        key = create_project(data_dir)["ingest_key"]
    finally:
        os.umask(umask)
    assert mode(data_dir / "pulse.db") == 0o600  # created private by the first command that needs it
    os.chmod(data_dir / "pulse.db", 0o644)  # as an older pulse, or a copy restored by hand, left it
    server = Server(data_dir)
    await server.start()
    try:
        await send(server, key, 5)
        assert mode(data_dir) == 0o700
        for name in ("pulse.db", "pulse.db-wal", "pulse.db-shm"):
            assert mode(data_dir / name) == 0o600, name
        backups = tmp_path / "backups"
        backups.mkdir()
        pulse("backup", str(backups), data_dir=data_dir)
        (copy,) = backups.iterdir()
        assert mode(copy) == 0o600
    finally:
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.slow
async def test_a_second_server_on_a_symlink_to_a_served_database_is_refused(tmp_path):
    first_dir = tmp_path / "data"
    key = create_project(first_dir)["ingest_key"]
    first = Server(first_dir)
    await first.start()
    second_dir = tmp_path / "other"
    second_dir.mkdir()
    (second_dir / "pulse.db").symlink_to(first_dir / "pulse.db")
    port = free_port()
    second = subprocess.Popen(
        [sys.executable, "-m", "pulse.cli", "serve", "--port", str(port), "--data-dir", str(second_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await send(first, key, 20)
        started = False
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # until it exits, or answers (which is the failure)
                if second.poll() is not None:
                    break
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as response:
                        started = response.status == 200
                except aiohttp.ClientError:
                    pass
                if started:
                    break
                await asyncio.sleep(0.05)
        assert not started and second.returncode not in (None, 0)
        output = second.stdout.read().strip().splitlines()
        assert output == [f"error: another pulse server is using the database {(first_dir / 'pulse.db').resolve()}"]
        await send(first, key, 20)
    finally:
        if second.poll() is None:
            second.terminate()
            second.wait(timeout=60)
        second.stdout.close()
        assert first.stop(signal.SIGTERM) == 0
    verified = subprocess.run([sys.executable, "-m", "pulse.cli", "verify", "--json", "--data-dir", str(first_dir)],
                              capture_output=True, text=True)
    assert verified.returncode == 0 and json.loads(verified.stdout)["differences"] == 0
