"""Every read of the read API is bounded in time and memory.

Windows and buckets are capped (a 400 that states the limit), dates out of range are 400s naming the
parameter, a read stops at its time limit wherever it is (SQL or Python), and a read nobody waits for any
more (its client disconnected, the server is shutting down) is stopped instead of running to its end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest

from pulse.config import Settings
from pulse.server.app import create_app
from pulse.server.params import MAX_HOURLY_DAYS, MAX_WINDOW_DAYS
from pulse.storage.model import ReadStopped
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.projects import create_project
from pulse.storage.sqlite.reader import Reader
from pulse.storage.sqlite.schema import migrate
from tests.servers import Server

DAY_MS = 86_400_000
INGEST = "/api/v1/events/ingest"
THOUSAND_YEARS = {"from": "1970-01-01", "to": "2969-12-31"}
ENDLESS = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
READS = 60  # requests whose reads queue on one reader thread


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def history(days: int, per_day: int) -> list[list[dict]]:
    """Batches of page views, `per_day` a day over the last `days` days, each with properties."""
    now = time.time_ns() // 1_000_000
    events = [{"event": "page_view", "uuid": str(uuid.uuid4()), "distinct_id": f"u{(day * per_day + i) % 5000}",
               "timestamp": now - day * DAY_MS - i * 1000, "properties": {"plan": "pro"}}
              for day in range(days) for i in range(per_day)]
    return [events[i:i + 1000] for i in range(0, len(events), 1000)]


async def send_history(session: aiohttp.ClientSession, url: str, ingest_key: str, days: int = 800,
                       per_day: int = 100) -> None:
    for batch in history(days, per_day):
        async with session.post(url + INGEST, json={"events": batch}, headers={"X-API-Key": ingest_key}) as response:
            assert response.status == 202, await response.text()


def today() -> str:
    return datetime.now(timezone.utc).date().isoformat()


def since(days: int) -> str:
    """The `from` of a window of `days` whole days ending with today (UTC, the project's zone)."""
    return (datetime.now(timezone.utc).date() - timedelta(days=days - 1)).isoformat()


def data_dir_with_project(tmp_path: Path) -> tuple[Path, int, str, str]:
    """A data directory with one project: (directory, project id, ingest key, read token)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    conn = connect(Settings(data_dir=data_dir).db_path)
    try:
        migrate(conn)
        project, ingest_key, read_token = create_project(conn, "site")
    finally:
        conn.close()
    return data_dir, project.id, ingest_key, read_token


def filtered_reads(project_id: int, token: str) -> list[str]:
    """Request paths of overviews over the longest window, each under its own filter (that no event matches):
    none is answered from what another computed, each reads the raw events of 800 days."""
    return [f"/api/v1/projects/{project_id}/overview?from={since(MAX_WINDOW_DAYS)}&prop.plan=x{i}&token={token}"
            for i in range(READS)]


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ReadServer(Server):
    project_id: int
    ingest_key: str
    token: str
    process: subprocess.Popen


async def start_server(tmp_path: Path, monkeypatch) -> ReadServer:
    """`pulse serve` with one reader thread, reads limited to 600 s and no warm-up."""
    data_dir, project_id, ingest_key, token = data_dir_with_project(tmp_path)
    for name, value in {"PULSE_READER_THREADS": "1", "PULSE_QUERY_TIMEOUT_S": "600", "PULSE_WARM_DAYS": "0"}.items():
        monkeypatch.setenv(name, value)
    server = ReadServer(data_dir)
    server.project_id, server.ingest_key, server.token = project_id, ingest_key, token
    await server.start()
    return server


# -- limits -----------------------------------------------------------------------------------------


@pytest.fixture
async def api(client, project):
    async def get(endpoint: str, **params):
        response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=params,
                                    headers={"Authorization": f"Bearer {project.read_token}"})
        return response.status, await response.json()

    return get


@pytest.mark.parametrize("endpoint", ["timeseries", "overview", "pages", "sessions", "events"])
async def test_a_window_longer_than_the_limit_is_a_400_stating_it(api, endpoint):
    status, body = await api(endpoint, **{"from": since(MAX_WINDOW_DAYS + 1), "to": today()})
    assert status == 400 and body["field"] == "to", body
    assert f"at most {MAX_WINDOW_DAYS} days" in body["error"]
    status, body = await api(endpoint, **{"from": since(MAX_WINDOW_DAYS + 1)})  # to: now
    assert status == 400 and body["field"] == "from", body
    status, body = await api(endpoint, **{"from": since(MAX_WINDOW_DAYS), "to": today()})
    assert status == 200, body


async def test_limits_count_days_of_the_projects_calendar(aiohttp_client, settings, make_project):
    """October 2025 in Berlin has 31 days and 745 hours (clocks went back on the 26th): hourly buckets for
    all of it, and no more."""
    berlin = make_project("berlin", timezone="Europe/Berlin")
    client = await aiohttp_client(create_app(settings))

    async def timeseries(start: str, end: str):
        response = await client.get(f"/api/v1/projects/{berlin.id}/timeseries?interval=hour&from={start}&to={end}",
                                    headers={"Authorization": f"Bearer {berlin.read_token}"})
        return response.status, await response.json()

    status, body = await timeseries("2025-10-01", "2025-10-31")
    assert status == 200 and len(body["buckets"]) == 745, body
    status, body = await timeseries("2025-10-01", "2025-11-01")
    assert status == 400 and body["field"] == "interval" and f"at most {MAX_HOURLY_DAYS} days" in body["error"]


@pytest.mark.parametrize(("params", "field"), [
    ({"from": "9999-12-30", "to": "9999-12-31"}, "to"),
    ({"from": "2026-01-01", "to": "9999-12-31"}, "to"),
    ({"from": "0001-01-01", "to": "0001-01-10"}, "from"),
    ({"from": "1969-12-31", "to": "1970-01-02"}, "from"),
    ({"from": "0001-01-01T00:00:00+00:00", "to": "0001-01-02T00:00:00+00:00"}, "from"),
    ({"from": "9999-12-30T00:00:00", "to": "9999-12-31T23:59:59"}, "to"),
    ({"from": "9999-12-31T12:00:00+00:00", "to": "9999-12-31T13:00:00+00:00"}, "from"),
])
@pytest.mark.parametrize("endpoint", ["timeseries", "overview", "top-events", "users"])
async def test_dates_out_of_range_are_400s_naming_the_parameter(api, endpoint, params, field):
    status, body = await api(endpoint, **params)
    assert status == 400 and body["field"] == field, body
    assert "out of range" in body["error"] and body["error"].startswith(f"{field}: ")


@pytest.mark.slow
async def test_a_thousand_years_are_refused_at_once_and_the_server_stays_small(tmp_path):
    """On a real `pulse serve`: the longest windows asked for are answered 400 while /health answers, and the
    server's memory does not grow (unbounded, one request grew it by about a gigabyte)."""
    data_dir, project_id, _, token = data_dir_with_project(tmp_path)
    server = Server(data_dir)
    await server.start()
    try:
        assert server.process is not None
        before = rss_kib(server.process.pid)
        timeout = aiohttp.ClientTimeout(total=120)  # bounded: an unbounded read would take minutes
        async with aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {token}"}) as session:
            async def get(path: str, **params) -> tuple[int, dict]:
                async with session.get(server.url + path, params=params) as response:
                    return response.status, await response.json()

            answers = await asyncio.gather(
                get(f"/api/v1/projects/{project_id}/timeseries", interval="day", **THOUSAND_YEARS),
                get(f"/api/v1/projects/{project_id}/overview", **THOUSAND_YEARS),
                get(f"/api/v1/projects/{project_id}/top-events", **{"from": "1970-01-01"}),
                get("/health"),
            )
        after = rss_kib(server.process.pid)
    finally:
        server.stop(signal.SIGTERM)
    for status, body in answers[:3]:
        assert status == 400 and f"at most {MAX_WINDOW_DAYS} days" in body["error"], body
    assert answers[3][0] == 200
    assert after - before < 100 * 1024, f"the server grew by {(after - before) // 1024} MiB"


# -- time limit --------------------------------------------------------------------------------------


async def test_a_read_stops_at_its_time_limit_in_python_loops_too(aiohttp_client, settings, project):
    """Days already in the readers' cache cost no SQL, so only the read's own checks can stop it: an overview
    of the longest windows is cut off at the time limit (503), not answered after it."""
    quick = await aiohttp_client(create_app(dataclasses.replace(settings, warm_days=0)))
    async with aiohttp.ClientSession() as session:
        await send_history(session, str(quick.make_url("")), project.ingest_key, days=60, per_day=20)
    path = f"/api/v1/projects/{project.id}/overview?from={since(MAX_WINDOW_DAYS)}&token={project.read_token}"
    assert (await quick.get(path)).status == 200  # fills the cache
    await quick.close()
    slow = await aiohttp_client(create_app(dataclasses.replace(settings, warm_days=0, query_timeout_s=1e-6)))
    response = await slow.get(path)
    assert response.status == 503 and response.headers["Retry-After"] == "10", await response.text()
    assert "narrow the range" in (await response.json())["error"]


# -- reads nobody waits for ------------------------------------------------------------------------


def run_endless(reader: Reader) -> tuple[asyncio.Future, threading.Event]:
    """A read of a statement that never ends, and an event set once it runs."""
    started = threading.Event()

    def endless(snap):
        started.set()
        return snap.conn.execute(ENDLESS).fetchone()

    return asyncio.ensure_future(reader.run(endless)), started


async def test_cancelling_a_read_interrupts_its_statement(settings, db):
    """A statement that never ends on its own: once its caller is cancelled, the only reader thread is free
    again and answers the next read (with a time limit far away, nothing else could end it)."""
    reader = Reader(settings.db_path, threads=1, timeout_s=90)
    try:
        endless, started = run_endless(reader)
        assert await asyncio.to_thread(started.wait, 30)
        endless.cancel()
        answer = await asyncio.wait_for(reader.run(lambda snap: snap.conn.execute("SELECT 42").fetchone()), 30)
        assert answer == (42,)
        assert endless.cancelled()
    finally:
        await reader.close()


async def test_closing_the_reader_interrupts_a_running_read(settings, db):
    reader = Reader(settings.db_path, threads=1, timeout_s=90)
    endless, started = run_endless(reader)
    assert await asyncio.to_thread(started.wait, 30)
    await asyncio.wait_for(reader.close(), 30)
    with pytest.raises(ReadStopped):
        await endless


@pytest.mark.slow
async def test_reads_of_clients_that_went_away_are_stopped_and_health_answers(tmp_path, monkeypatch):
    """On a real `pulse serve` (aiohttp does not cancel its handlers when a client disconnects): requests whose
    reads queue on the one reader thread, their time limit far away; /health answers meanwhile. Then their
    clients disconnect: their reads are stopped, and the server spends on them the CPU time of a few reads,
    not of all that were left."""
    server = await start_server(tmp_path, monkeypatch)
    pid = server.process.pid
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            await send_history(session, server.url, server.ingest_key)
            paths = filtered_reads(server.project_id, server.token)
            began = cpu_seconds(pid)
            for path in paths[:4]:  # what one read costs
                async with session.get(server.url + path) as response:
                    assert response.status == 200
            one = (cpu_seconds(pid) - began) / 4
            streams = []
            for path in paths[4:]:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: pulse\r\n\r\n".encode())
                streams.append((reader, writer))
            await asyncio.sleep(0.5)  # the server takes the requests up: one read runs, the others wait
            async with session.get(server.url + "/health") as response:
                assert response.status == 200
            left = cpu_seconds(pid)
            for _, writer in streams:
                writer.close()
            async with session.get(f"{server.url}/api/v1/projects/{server.project_id}/top-events?range=24h"
                                   f"&token={server.token}") as response:  # queued behind what still runs
                assert response.status == 200
            spent = cpu_seconds(pid) - left
    finally:
        server.stop(signal.SIGTERM)
    assert spent < len(streams) / 4 * one, f"{spent:.2f} s of CPU after the clients left; one read takes {one:.2f} s"


@pytest.mark.slow
async def test_sigterm_stops_running_reads_and_exits_zero(tmp_path, monkeypatch):
    """SIGTERM while reads queue on the one reader thread (their time limit far away): every one not done yet
    is stopped and answered 503 with Retry-After, and the server exits 0."""
    server = await start_server(tmp_path, monkeypatch)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            await send_history(session, server.url, server.ingest_key)

            async def get(path: str) -> tuple[int, str | None]:
                async with session.get(server.url + path) as response:
                    return response.status, response.headers.get("Retry-After")

            reads = [asyncio.ensure_future(get(path)) for path in filtered_reads(server.project_id, server.token)]
            await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)  # the others run or wait for the thread
            code = await asyncio.to_thread(server.stop, signal.SIGTERM)
            answers = await asyncio.gather(*reads)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert code == 0
    assert all(status in (200, 503) for status, _ in answers), answers
    stopped = [retry for status, retry in answers if status == 503]
    assert len(stopped) >= READS // 2 and all(retry for retry in stopped), answers


# -- the CLI --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [("--to", "9999-12-31"), ("--from", "0001-01-01")])
def test_export_with_a_date_out_of_range_fails_in_one_line(tmp_path, bound):
    data_dir, _, _, _ = data_dir_with_project(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pulse.cli", "export", "site", *bound, "--data-dir", str(data_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {bound[0]}: ") and "out of range" in result.stderr
    assert result.stdout == ""
