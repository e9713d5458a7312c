"""A real `pulse serve` process under load: SIGTERM drains and exits 0; SIGKILL loses no acknowledged event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest

from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.maintenance import verify
from tests.conftest import recount_hourly, rollups
from tests.servers import Server, pulse

pytestmark = pytest.mark.slow


async def load(url: str, key: str, acked: set[bytes], stop: asyncio.Event, workers: int = 16) -> int:
    """Post batches until told to stop or the server goes away; remember every uuid whose 202 arrived."""
    sent = 0

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal sent
        while not stop.is_set():
            ids = [uuid.uuid4() for _ in range(20)]
            body = {"events": [{"event": "tick", "uuid": str(u), "distinct_id": f"w{n}-{u.int % 7}",
                                "session_id": f"w{n}"} for u in ids]}
            try:
                async with session.post(f"{url}/api/v1/events/ingest", json=body,
                                        headers={"X-API-Key": key}) as response:
                    if response.status == 202:
                        acked.update(u.bytes for u in ids)
                    sent += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(worker(session, n) for n in range(workers)))
    return sent


def stored(data_dir: Path, project_id: int) -> tuple[list[bytes], dict, dict]:
    conn = connect(data_dir / "pulse.db")
    try:
        uuids = [row[0] for row in conn.execute("SELECT uuid FROM events WHERE project_id = ?", (project_id,))]
        return uuids, recount_hourly(conn, project_id), rollups(conn, project_id)
    finally:
        conn.close()


def assert_consistent(data_dir: Path, project_id: int, acked: set[bytes]) -> None:
    uuids, expected, found = stored(data_dir, project_id)
    assert len(uuids) == len(set(uuids)), "an event was stored twice"
    missing = acked - set(uuids)
    assert not missing, f"{len(missing)} acknowledged events were lost"
    assert {k: v[:3] for k, v in found.items()} == expected, "rollups disagree with the raw events"
    conn = connect(data_dir / "pulse.db")
    try:
        # the server stopped last with SIGTERM: every session and person change kept in memory was written
        # (after a killed writer, rebuilt from the events first), so verify leaves nothing out
        written = conn.execute("SELECT value FROM meta WHERE key = 'derived_through'").fetchone()[0]
        assert written == conn.execute("SELECT max(id) FROM events").fetchone()[0]
        assert [str(d) for d in verify(conn)] == []
    finally:
        conn.close()


@pytest.fixture
def created(tmp_path):
    data_dir = tmp_path / "data"
    body = json.loads(pulse("projects", "create", "load", "--json", data_dir=data_dir).stdout)
    return data_dir, body


@pytest.fixture
async def server(created):
    """A started server on the created project's data directory; stopped at the end if still running."""
    running = Server(created[0])
    await running.start()
    yield running
    if running.process.poll() is None:
        running.stop(signal.SIGKILL)


async def test_sigterm_under_load_drains_and_exits_zero(created, server):
    data_dir, project = created
    acked: set[bytes] = set()
    stop = asyncio.Event()
    task = asyncio.create_task(load(server.url, project["ingest_key"], acked, stop))
    await asyncio.sleep(0.7)
    # the CLI works on the live database while the server is under load
    other = json.loads((await asyncio.to_thread(pulse, "projects", "create", "other", "--json",
                                                data_dir=data_dir)).stdout)
    await asyncio.to_thread(pulse, "keys", "rotate", "other", "--read", data_dir=data_dir)
    listed = json.loads((await asyncio.to_thread(pulse, "projects", "list", "--json", data_dir=data_dir)).stdout)
    assert [p["name"] for p in listed["projects"]] == ["load", "other"] and other["id"] == 2
    await asyncio.sleep(0.7)
    assert acked, "no batch was acknowledged before the signal"
    code = await asyncio.to_thread(server.stop, signal.SIGTERM)
    stop.set()
    await task
    assert code == 0
    assert_consistent(data_dir, project["id"], acked)


async def test_sigkill_under_load_loses_no_acknowledged_event(created):
    data_dir, project = created
    acked: set[bytes] = set()
    for round_ in range(3):
        server = Server(data_dir)
        await server.start()
        stop = asyncio.Event()
        task = asyncio.create_task(load(server.url, project["ingest_key"], acked, stop))
        await asyncio.sleep(0.7 + 0.4 * round_)
        await asyncio.to_thread(server.stop, signal.SIGKILL)
        stop.set()
        await task
    server = Server(data_dir)  # restart once more: recovery must not change anything
    await server.start()
    assert server.stop(signal.SIGTERM) == 0
    assert len(acked) > 1000
    assert_consistent(data_dir, project["id"], acked)


async def test_a_killed_writer_process_is_replaced_and_nothing_acknowledged_is_lost(created, server):
    data_dir, project = created
    acked: set[bytes] = set()
    stop = asyncio.Event()
    task = asyncio.create_task(load(server.url, project["ingest_key"], acked, stop, workers=8))
    await asyncio.sleep(0.7)
    writer_pid = int(subprocess.run(["pgrep", "-P", str(server.process.pid), "-f", "writer_process"],
                                    capture_output=True, text=True, check=True).stdout.split()[0])
    os.kill(writer_pid, signal.SIGKILL)
    before = len(acked)
    for _ in range(100):  # ingest comes back by itself
        await asyncio.sleep(0.1)
        if len(acked) > before + 200:
            break
    stop.set()
    await task
    assert len(acked) > before + 200, "ingest did not recover after the writer process died"
    assert server.stop(signal.SIGTERM) == 0
    assert_consistent(data_dir, project["id"], acked)


async def test_sigterm_closes_live_feeds_with_going_away(created, server):
    data_dir, project = created
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/api/v1/ws/events/{project['id']}",
                                      params={"token": project["read_token"]}) as ws:
            assert "hello" in await ws.receive_str()
            code = asyncio.create_task(asyncio.to_thread(server.stop, signal.SIGTERM))
            message = await asyncio.wait_for(ws.receive(), 10)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
            assert await code == 0
