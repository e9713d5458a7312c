"""The writer's WAL under sustained load, a really full disk, and a stopped writer, on a real `pulse serve`.

Every event whose 202 a client received must be stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest

from pulse.storage.sqlite.connection import connect
from tests.servers import Server, pulse
from tests.test_durability import assert_consistent
from tests.test_faults import children, stored_uuids

pytestmark = pytest.mark.slow
MB = 1024 * 1024
WAL_BOUND = 64 * MB  # README: the -wal file stays under 64 MiB (restarted at 32 MiB)
LIMIT = aiohttp.ClientTimeout(total=30)  # generous: only so that a hung request cannot hang the test


class Load:
    """Clients posting batches of `batch` events until stopped; remembers every acknowledged uuid and the
    status (and Retry-After) of every answer."""

    def __init__(self, url: str, key: str, *, workers: int = 4, batch: int = 10) -> None:
        self.url, self.key, self.workers, self.batch = url, key, workers, batch
        self.acked: set[bytes] = set()
        self.answers: list[tuple[int, str | None]] = []
        self.stopping = asyncio.Event()

    async def post(self, session: aiohttp.ClientSession) -> int:
        ids = [uuid.uuid4() for _ in range(self.batch)]
        body = {"events": [{"event": "tick", "uuid": str(u), "distinct_id": f"u{u.int % 97}",
                            "session_id": f"s{u.int % 31}", "properties": {"n": u.int % 1000}} for u in ids]}
        async with session.post(f"{self.url}/api/v1/events/ingest", json=body,
                                headers={"X-API-Key": self.key}) as response:
            await response.read()
            if response.status == 202:
                self.acked.update(u.bytes for u in ids)
            self.answers.append((response.status, response.headers.get("Retry-After")))
            return response.status

    async def run(self, until_acked: int | None = None) -> None:
        async def worker(session: aiohttp.ClientSession) -> None:
            while not self.stopping.is_set() and (until_acked is None or len(self.acked) < until_acked):
                if await self.post(session) != 202:
                    await asyncio.sleep(0.05)

        async with aiohttp.ClientSession(timeout=LIMIT) as session:
            await asyncio.gather(*(worker(session) for _ in range(self.workers)))

    async def post_once(self) -> int:
        async with aiohttp.ClientSession(timeout=LIMIT) as session:
            return await self.post(session)

    def statuses(self) -> list[int]:
        return [status for status, _ in self.answers]


async def sample_wal(wal: Path, peak: list[int], stop: asyncio.Event) -> None:
    """Keep the largest size the -wal file had, every 10 ms."""
    while not stop.is_set():
        with contextlib.suppress(FileNotFoundError):
            peak[0] = max(peak[0], wal.stat().st_size)
        await asyncio.sleep(0.01)


async def health(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/health") as response:
        assert response.status == 200  # a stalled writer shows in the body, the server itself answers
        return await response.json()


@pytest.fixture
def project(tmp_path):
    data_dir = tmp_path / "data"
    return data_dir, json.loads(pulse("projects", "create", "wal", "--json", data_dir=data_dir).stdout)


async def test_the_wal_stays_bounded_under_sustained_ingest(project):
    """Four clients send 10-event batches without a pause: passive checkpoints alone never restart the WAL
    (it grew by 1.5 to 5.7 KB per event), so 100,000 events took it far past 64 MiB."""
    data_dir, created = project
    server = Server(data_dir)
    await server.start()
    load = Load(server.url, created["ingest_key"])
    peak, stop = [0], asyncio.Event()
    sampler = asyncio.create_task(sample_wal(data_dir / "pulse.db-wal", peak, stop))
    try:
        await load.run(until_acked=100_000)
    finally:
        stop.set()
        await sampler
        code = server.stop(signal.SIGTERM)
    print(f"\nWAL: peak {peak[0] / MB:.1f} MiB over {len(load.acked):,} events")
    assert code == 0
    assert len(load.acked) >= 100_000 and set(load.statuses()) == {202}
    assert 0 < peak[0] < WAL_BOUND
    assert_consistent(data_dir, created["id"], load.acked)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a disk that really fills up (not the PULSE_MAX_DB_MB quota)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def writer_io(pid: int) -> int:
    """Bytes the writer process has handed to write(2) so far (WAL, checkpoints, its answers)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


async def test_a_really_full_disk_answers_503_then_checkpoints_resume_when_space_returns(small_disk):
    """Checkpoints died on the first full-disk error: after space was freed the WAL grew until the disk
    was full again (about 15 s into the load) and ingest answered 503 until a restart. Here, after the
    disk is freed, the writer writes three times the disk's size and every batch is stored."""
    data_dir = small_disk  # the server's log goes beside it, off the small disk
    created = json.loads(pulse("projects", "create", "full", "--json", data_dir=data_dir).stdout)
    server = Server(data_dir)
    await server.start()
    writer = children(server.process.pid)[0]
    filler = small_disk / "filler"
    # a read (a dashboard query, a backup) holds its snapshot while the disk fills: the WAL cannot be
    # copied into the database meanwhile, so the checkpoints after it need space the disk no longer has
    reader = connect(data_dir / "pulse.db", readonly=True)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchall()
        free = shutil.disk_usage(small_disk).free
        with open(filler, "wb") as out:  # leave the database about 4 MiB
            block = b"\0" * MB
            for _ in range(max(0, (free - 4 * MB) // MB)):
                out.write(block)
        load = Load(server.url, created["ingest_key"], batch=50)
        stopping = asyncio.create_task(load.run())
        for _ in range(600):  # until the disk is full: a bounded wait
            await asyncio.sleep(0.05)
            if 503 in load.statuses():
                break
        load.stopping.set()
        await stopping
        with open(filler, "ab", buffering=0) as out, contextlib.suppress(OSError):  # every last byte
            while True:
                out.write(b"\0" * 4096)
        reader.execute("COMMIT")
        reader.close()
        await asyncio.sleep(1)  # checkpoints (every 0.2 s) try to copy the WAL into the database and fail
        for _ in range(3):  # 503 while nothing fits; 202 only when a commit fit in WAL space already there
            assert await load.post_once() in (202, 503)
        assert 503 in load.statuses() and 202 in load.statuses(), load.statuses()[-5:]
        assert all(after for status, after in load.answers if status == 503)  # with Retry-After
        async with aiohttp.ClientSession(timeout=LIMIT) as session:
            await health(session, server.url)
        stored = stored_uuids(data_dir, created["id"])
        assert load.acked <= set(stored) and len(stored) == len(set(stored))

        filler.unlink()  # space returns
        before = writer_io(writer)
        target = 3 * 64 * MB  # far more WAL than the disk holds: only checkpoints that restart it keep up
        again = Load(server.url, created["ingest_key"])
        done = asyncio.Event()

        async def watch() -> None:
            while writer_io(writer) - before < target and not again.stopping.is_set():
                await asyncio.sleep(0.05)
            again.stopping.set()
            done.set()

        watcher = asyncio.create_task(watch())

        async def stop_at_first_refusal() -> None:
            while not done.is_set():
                if any(status != 202 for status in again.statuses()):
                    again.stopping.set()
                    return
                await asyncio.sleep(0.05)

        refusals = asyncio.create_task(stop_at_first_refusal())
        await again.run()
        await watcher
        await refusals
        written = writer_io(writer) - before
        wal = (data_dir / "pulse.db-wal").stat().st_size
        print(f"\nfull disk: {load.statuses().count(202)} batches stored, then 503; after freeing it"
              f" {len(again.acked):,} events ({written / MB:.0f} MiB written), WAL {wal / MB:.1f} MiB")
        assert set(again.statuses()) == {202}, sorted(set(again.statuses()))
        assert written >= target
        assert wal < WAL_BOUND
        assert server.stop(signal.SIGTERM) == 0
        assert_consistent(data_dir, created["id"], load.acked | again.acked)
    finally:
        reader.close()
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
        filler.unlink(missing_ok=True)


async def test_a_stopped_writer_gets_503s_within_the_deadline_and_loses_nothing(project, monkeypatch):
    """With the writer process stopped, ingest and reads waited for the whole stall (a read past its own
    timeout); /health did not tell. Here they are answered 503 with Retry-After after PULSE_WRITE_TIMEOUT_S,
    new ingest at once, and after SIGCONT every acknowledged event is stored once."""
    monkeypatch.setenv("PULSE_WRITE_TIMEOUT_S", "1")
    data_dir, created = project
    server = Server(data_dir)
    await server.start()
    writer = children(server.process.pid)[0]
    load = Load(server.url, created["ingest_key"])
    running = asyncio.create_task(load.run())
    read_token = {"Authorization": f"Bearer {created['read_token']}"}
    overview = f"{server.url}/api/v1/projects/{created['id']}/overview"
    stopped = False
    try:
        async with aiohttp.ClientSession(timeout=LIMIT) as session:
            for _ in range(600):
                if len(load.acked) > 2000:
                    break
                await asyncio.sleep(0.02)
            assert load.acked, "no batch was acknowledged before the stop"
            # A read needs the writer only while it keeps acknowledged changes in memory, as it does
            # under load almost always; if it had just written them, the read is exact and answered.
            for _ in range(10):
                os.kill(writer, signal.SIGSTOP)
                stopped = True
                async with session.get(overview, headers=read_token) as read:
                    read_status, read_after = read.status, read.headers.get("Retry-After")
                    read_body = await read.json()
                if read_status != 200:
                    break
                os.kill(writer, signal.SIGCONT)
                stopped = False
                await asyncio.sleep(0.3)
            assert read_status == 503 and read_after, (read_status, read_body)
            assert "stalled" in read_body["error"]

            for _ in range(600):  # the load's requests waiting for the writer time out
                if 503 in load.statuses():
                    break
                await asyncio.sleep(0.05)
            refused = [after for status, after in load.answers if status == 503]
            assert refused and all(refused), "ingest was not answered 503 with Retry-After"
            state = await health(session, server.url)
            assert state["writer"] == "stalled" and state["writer_lag_seconds"] >= 1, state
            async with session.post(f"{server.url}/api/v1/events/ingest", json={"events": [{"event": "late"}]},
                                    headers={"X-API-Key": created["ingest_key"]}) as response:
                assert response.status == 503 and response.headers["Retry-After"]  # refused at once
            async with session.get(f"{server.url}/metrics") as response:
                assert "pulse_writer_stalled 1\n" in await response.text()

            os.kill(writer, signal.SIGCONT)
            stopped = False
            for _ in range(600):
                if (await health(session, server.url))["writer"] == "ok":
                    break
                await asyncio.sleep(0.05)
            assert (await health(session, server.url))["writer"] == "ok"
            acked_before = len(load.acked)
            for _ in range(600):  # ingest comes back by itself
                if len(load.acked) > acked_before + 200:
                    break
                await asyncio.sleep(0.05)
            assert len(load.acked) > acked_before + 200
    finally:
        if stopped:
            os.kill(writer, signal.SIGCONT)
        load.stopping.set()
        await running
    assert server.stop(signal.SIGTERM) == 0
    print(f"\nstopped writer: {load.statuses().count(503)} ingest requests answered 503,"
          f" {len(load.acked):,} events acknowledged")
    assert_consistent(data_dir, created["id"], load.acked)
