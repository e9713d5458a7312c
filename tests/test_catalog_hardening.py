"""Catalog changes take effect whatever is in flight: a grace period ends live feeds on time, a deleted
project leaves no row behind however many batches were queued for it, and verify finds rows of no project."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time

import aiohttp

from pulse.protocol import LiveEvents, LiveHello, live_decoder
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.maintenance import verify
from pulse.storage.sqlite.projects import create_project, delete_project, get_project, rotate_key
from pulse.storage.sqlite.schema import migrate
from tests.conftest import event
from tests.servers import Server

INGEST = "/api/v1/events/ingest"
GRACE_S = 2
# a batch posted this long after the grace period ended was committed after it, whatever the scheduling
SLACK_MS = 300
WAIT_S = 15.0  # bound on every wait, so a broken server fails the test rather than hanging it


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_read_token_past_its_grace_period_loses_its_live_feed(client, project, db):
    ws = await client.ws_connect(f"/api/v1/ws/events/{project.id}", params={"token": project.read_token})
    assert isinstance(live_decoder.decode(await ws.receive_str()), LiveHello)
    rotate_key(db, get_project(db, project.id), "read", grace_seconds=GRACE_S)
    expires = db.execute("SELECT expires_at FROM keys WHERE project_id = ? AND kind = 'read'"
                         " AND expires_at IS NOT NULL", (project.id,)).fetchone()[0]

    posted_at: dict[int, int] = {}  # batch number -> when its POST started (wall clock, ms)
    stop = asyncio.Event()

    async def ingest() -> None:
        batch = 0
        while not stop.is_set():
            posted_at[batch] = wall_ms()
            body = {"events": [event("tick", properties={"batch": batch}) for _ in range(5)]}
            response = await client.post(INGEST, json=body, headers={"X-API-Key": project.ingest_key})
            assert response.status == 202
            batch += 1
            await asyncio.sleep(0.005)

    load = asyncio.create_task(ingest())
    received: list[int] = []
    closing = None
    try:
        deadline = time.monotonic() + GRACE_S + WAIT_S
        while time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(ws.receive(), deadline - time.monotonic())
            except TimeoutError:
                break
            if message.type != aiohttp.WSMsgType.TEXT:
                closing = message
                break
            decoded = live_decoder.decode(message.data)
            if isinstance(decoded, LiveEvents):
                received.extend(e.properties["batch"] for e in decoded.events)
        # ingest goes on a little past the close: those batches are not for this feed either
        await asyncio.sleep(2 * SLACK_MS / 1000)
    finally:
        stop.set()
        await load
    assert closing is not None and closing.type == aiohttp.WSMsgType.CLOSE, "the feed outlived its grace period"
    assert ws.close_code == 4001
    assert received and min(posted_at[b] for b in received) < expires  # it was fed until then
    late = sorted({b for b in received if posted_at[b] > expires + SLACK_MS})
    assert not late, f"batches posted after the grace period ended reached the feed: {late[:10]}"
    assert max(posted_at.values()) > expires + SLACK_MS  # there were such batches


async def test_an_idle_live_feed_is_closed_when_its_read_tokens_grace_period_ends(client, project, db):
    """Nothing is sent on the feed, so only the keyring's own timer can notice the grace period end."""
    ws = await client.ws_connect(f"/api/v1/ws/events/{project.id}", params={"token": project.read_token})
    assert isinstance(live_decoder.decode(await ws.receive_str()), LiveHello)
    rotate_key(db, get_project(db, project.id), "read", grace_seconds=GRACE_S)
    expires = db.execute("SELECT expires_at FROM keys WHERE project_id = ? AND kind = 'read'"
                         " AND expires_at IS NOT NULL", (project.id,)).fetchone()[0]
    message = await asyncio.wait_for(ws.receive(), GRACE_S + WAIT_S)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4001
    assert wall_ms() >= expires  # closed by the end of the grace period, not by the rotation itself
    refused = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {project.read_token}"})
    assert refused.status == 401


TABLES = ("events", "hourly", "hourly_dims", "sessions", "session_days", "persons", "person_ids", "keys")
WORKERS = 16
ROUNDS = 3


async def _delete_under_load(url: str, conn, name: str) -> tuple[int, collections.Counter]:
    """Post batches for a new project from WORKERS clients, delete it meanwhile, and go on until every
    client has been refused; the project's id and every status answered."""
    project, ingest_key, _ = create_project(conn, name)
    statuses: collections.Counter = collections.Counter()
    refused: set[int] = set()
    deleted = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        batch = 0
        while n not in refused:
            body = {"events": [event("tick", distinct_id=f"{name}-{n}-{i % 3}", session_id=f"{name}-{n}",
                                     page_url=f"https://site.example/{batch}") for i in range(25)]}
            async with session.post(url + INGEST, json=body, headers={"X-API-Key": ingest_key}) as response:
                statuses[response.status] += 1
                if response.status == 401:
                    refused.add(n)
                    assert deleted.is_set(), "the key was refused before its project was deleted"
            batch += 1

    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=WORKERS)) as session:
        async with asyncio.timeout(WAIT_S):  # the server notices the new project within a quarter second
            while True:
                async with session.post(url + INGEST, json={"events": [event("first")]},
                                        headers={"X-API-Key": ingest_key}) as response:
                    if response.status == 202:
                        break
                await asyncio.sleep(0.05)
        workers = [asyncio.create_task(worker(session, n)) for n in range(WORKERS)]
        try:
            async with asyncio.timeout(WAIT_S):
                while statuses[202] < 5 * WORKERS:  # the server knows the key, and every client is busy
                    await asyncio.sleep(0.01)
            other = connect(conn.filename)  # the CLI's connection: its own, waiting for the write lock
            try:
                deleted.set()
                await asyncio.to_thread(delete_project, other, project)
            finally:
                other.close()
            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return project.id, statuses


async def test_deleting_a_project_under_load_leaves_none_of_its_rows(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    conn = connect(data_dir / "pulse.db")
    migrate(conn)
    server = Server(data_dir)
    await server.start()
    try:
        rounds = [await _delete_under_load(server.url, conn, f"doomed{i}") for i in range(ROUNDS)]
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0  # the writer wrote everything it kept, then exited
    for _, statuses in rounds:
        assert set(statuses) <= {202, 401}, statuses
    left = {(pid, table): conn.execute(f"SELECT count(*) FROM {table} WHERE project_id = ?", (pid,)).fetchone()[0]
            for pid, _ in rounds for table in TABLES}
    assert {k: n for k, n in left.items() if n} == {}, "rows of deleted projects were written after the delete"
    assert [str(d) for d in verify(conn)] == []
    conn.close()


def test_verify_reports_rows_of_projects_that_do_not_exist(settings, db, project):
    gone = project.id + 41
    db.pragma("foreign_keys", False)  # a key row of no project, as a database from before the delete fix holds
    db.execute("BEGIN")
    db.execute("INSERT INTO events(project_id, uuid, ts, received, name_id, person_id) VALUES (?, x'01', 0, 0, 1, 1)",
               (gone,))
    db.execute("INSERT INTO hourly VALUES (?, 0, 0, 0, 0, 1, 1, 1, x'', x'')", (gone,))
    db.execute("INSERT INTO hourly_dims VALUES (?, 1, 0, 1, 0, 0, 1, 1, x'')", (gone,))
    db.execute("INSERT INTO sessions(project_id, session_key, person_id, first_ts, last_ts) VALUES (?, 's', 1, 0, 0)",
               (gone,))
    db.execute("INSERT INTO session_days VALUES (?, 0, 1)", (gone,))
    db.execute("INSERT INTO persons(project_id, distinct_id, first_seen, last_seen) VALUES (?, 'u', 0, 0)", (gone,))
    db.execute("INSERT INTO person_ids VALUES (?, 'u', 1), (?, 'v', 1)", (gone, gone))
    db.execute("INSERT INTO keys(project_id, kind, digest, prefix, created_at) VALUES (?, 'read', x'02', 'sk_', 0)",
               (gone,))
    db.execute("COMMIT")
    db.pragma("foreign_keys", True)

    found = verify(db)
    assert {(d.project_id, d.what, d.stored) for d in found} == {
        (gone, "events", 1), (gone, "hourly", 1), (gone, "hourly_dims", 1), (gone, "sessions", 1),
        (gone, "session_days", 1), (gone, "persons", 1), (gone, "person_ids", 2), (gone, "keys", 1)}
    assert verify(db, [get_project(db, project.id)]) == []  # they belong to no project checked alone

    result = subprocess.run([sys.executable, "-m", "pulse.cli", "verify", "--data-dir", str(settings.data_dir)],
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"project {gone} events" in result.stdout and "8 differences" in result.stdout
