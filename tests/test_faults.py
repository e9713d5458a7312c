"""Faults on a real `pulse serve`: a full disk, another process holding the write lock, SIGKILL at random.

Every event whose 202 a client received must be stored exactly once, and `pulse verify` must agree.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from pulse.storage.sqlite.connection import connect
from tests.servers import Server, pulse
from tests.test_durability import assert_consistent, load

pytestmark = pytest.mark.slow
DAY_MS = 86_400_000


def verify_cli(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pulse.cli", "verify", "--json", "--data-dir", str(data_dir)],
                          capture_output=True, text=True)


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found += [int(child) for child in listing.read().split()]
    return found


def stored_uuids(data_dir, project_id: int) -> list[bytes]:
    conn = connect(data_dir / "pulse.db", readonly=True)
    try:
        return [r[0] for r in conn.execute("SELECT uuid FROM events WHERE project_id = ?", (project_id,))]
    finally:
        conn.close()


async def test_a_full_disk_answers_503_loses_nothing_and_recovers_when_space_returns(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    project = json.loads(pulse("projects", "create", "full", "--retention-days", "1", "--json",
                               data_dir=data_dir).stdout)
    monkeypatch.setenv("PULSE_MAX_DB_MB", "3")  # a 3 MiB "disk"
    server = Server(data_dir)
    await server.start()
    acked: set[bytes] = set()
    statuses: list[int] = []
    old = int(time.time() * 1000) - 3 * DAY_MS  # past the one-day retention: prune can free it later
    async with aiohttp.ClientSession() as session:

        async def post(ts: int) -> int:
            ids = [uuid.uuid4() for _ in range(100)]
            body = {"events": [{"event": "fill", "uuid": str(u), "distinct_id": f"u{u.int % 50}", "timestamp": ts,
                                "properties": {"pad": "x" * 300}} for u in ids]}
            async with session.post(f"{server.url}/api/v1/events/ingest", json=body,
                                    headers={"X-API-Key": project["ingest_key"]}) as response:
                if response.status == 202:
                    acked.update(u.bytes for u in ids)
                elif response.status == 503:
                    assert response.headers["Retry-After"] and "storage error" in (await response.json())["error"]
                return response.status

        for _ in range(400):
            statuses.append(await post(old))
            if statuses[-3:] == [503, 503, 503]:
                break
        assert 503 in statuses and statuses[0] == 202, statuses
        print(f"\nfull disk: {statuses.count(202)} batches stored, then {statuses.count(503)} answered 503")
        async with session.get(f"{server.url}/health") as response:
            assert response.status == 200  # the server stays up
        stored = stored_uuids(data_dir, project["id"])
        assert acked <= set(stored) and len(stored) == len(set(stored)) == len(acked)

        pruned = json.loads((await asyncio.to_thread(pulse, "prune", "--json", data_dir=data_dir)).stdout)
        assert pruned["deleted"]["full"] == len(acked)  # space returns
        after = [await post(int(time.time() * 1000)) for _ in range(5)]
        assert after == [202] * 5, after
    assert server.stop(signal.SIGTERM) == 0
    result = verify_cli(data_dir)
    assert result.returncode == 0, result.stdout


async def test_another_process_holding_the_write_lock_delays_ingest_without_errors(tmp_path):
    data_dir = tmp_path / "data"
    project = json.loads(pulse("projects", "create", "locked", "--json", data_dir=data_dir).stdout)
    server = Server(data_dir)
    await server.start()
    holder = connect(data_dir / "pulse.db")
    holder.execute("BEGIN IMMEDIATE")  # as a long CLI command or a backup might
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        request = asyncio.create_task(session.post(
            f"{server.url}/api/v1/events/ingest", json={"events": [{"event": "waited", "distinct_id": "u"}]},
            headers={"X-API-Key": project["ingest_key"]}))
        await asyncio.sleep(1.5)
        assert not request.done()
        holder.execute("COMMIT")
        response = await request
        assert response.status == 202 and time.monotonic() - started >= 1.5
        response.release()
    holder.close()
    assert server.stop(signal.SIGTERM) == 0
    assert len(stored_uuids(data_dir, project["id"])) == 1


async def test_chaos_sigkill_at_random_moments_keeps_every_acknowledged_event_once(tmp_path):
    seed = int(os.environ.get("PULSE_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    project = json.loads(pulse("projects", "create", "chaos", "--json", data_dir=data_dir).stdout)
    acked: set[bytes] = set()
    kills = 5
    for _ in range(kills):
        server = Server(data_dir)
        await server.start()
        stop = asyncio.Event()
        task = asyncio.create_task(load(server.url, project["ingest_key"], acked, stop, workers=12))
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        writer = children(server.process.pid)
        for pid in writer:  # the writer process too, so a transaction dies half-done
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(server.stop, signal.SIGKILL)
        stop.set()
        await task
    server = Server(data_dir)
    await server.start()
    assert server.stop(signal.SIGTERM) == 0
    stored = stored_uuids(data_dir, project["id"])
    print(f"\nchaos (seed {seed}): {kills} SIGKILLs of server and writer, {len(acked):,} events acknowledged, {len(stored):,} stored"
          f" ({len(stored) - len(acked):,} stored without an answer), 0 lost")
    assert len(acked) > 1000
    assert_consistent(data_dir, project["id"], acked)
    result = verify_cli(data_dir)
    assert result.returncode == 0 and json.loads(result.stdout)["differences"] == 0, result.stdout


async def test_status_backup_export_and_verify_while_ingest_runs(tmp_path):
    data_dir = tmp_path / "data"
    project = json.loads(pulse("projects", "create", "busy", "--json", data_dir=data_dir).stdout)
    server = Server(data_dir)
    await server.start()
    acked: set[bytes] = set()
    stop = asyncio.Event()
    task = asyncio.create_task(load(server.url, project["ingest_key"], acked, stop, workers=8))
    await asyncio.sleep(0.8)
    status = json.loads((await asyncio.to_thread(pulse, "status", "--json", data_dir=data_dir)).stdout)
    assert status["server"] == "up" and status["events_today"]["busy"] > 0 and status["database_bytes"] > 0
    copied = json.loads((await asyncio.to_thread(pulse, "backup", str(tmp_path / "copy.db"), "--json",
                                                 data_dir=data_dir)).stdout)
    exported = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "pulse.cli", "export", "busy",
                                                        "--format", "jsonl", "--data-dir", str(data_dir)],
                                       capture_output=True, text=True, check=True)
    during = verify_cli(data_dir)  # a consistent snapshot even mid-ingest
    stop.set()
    await task
    assert server.stop(signal.SIGTERM) == 0
    assert during.returncode == 0, during.stdout
    assert copied["bytes"] > 0
    copy_dir = tmp_path / "restored"
    copy_dir.mkdir()
    (tmp_path / "copy.db").rename(copy_dir / "pulse.db")
    assert verify_cli(copy_dir).returncode == 0  # the copy is a consistent database on its own
    lines = exported.stdout.splitlines()
    assert lines and all(json.loads(line)["event"] == "tick" for line in lines)
    assert len({json.loads(line)["uuid"] for line in lines}) == len(lines)
    stopped = subprocess.run([sys.executable, "-m", "pulse.cli", "status", "--data-dir", str(data_dir)],
                             capture_output=True, text=True)
    assert stopped.returncode == 3 and "not running" in stopped.stdout
