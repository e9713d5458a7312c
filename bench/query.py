"""Read API benchmark: every endpoint over a month of events, against a plain scan of the raw table.

    python bench/query.py [--events 10000000] [--runs 5]

Loads the events through the real writer (30 days, ~50 event names, 100k users with traits, 300k sessions, a
quarter of them from a newsletter link), then runs `pulse serve` on that database twice, one after the other
(one server per database):

- first with no cache (PULSE_CACHE_MIB=0, no start-up warm-up), so that every request is a first request: it
  times how long the event columns take to build at the first start (or to load, when they exist), their size
  on disk, and one request per endpoint and filter kind;
- then as configured: it waits for the start-up warm-up, times each endpoint over HTTP for range=30d, under each
  filter kind, the first request and the repeats, the journeys among them (a 3-step funnel over the month, 8
  weeks of retention, the paths from a page).

Each server's timing starts once its columns are built. A plain SQL scan of the raw events giving the same
answer is timed in the same run. Prints p50 and p95 (ms), the ratio raw scan / endpoint, and per filter kind
and endpoint the first request with nothing cached next to the repeats' p50 and p95. Loopback only; stops by
itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, wait_http  # noqa: E402
from pulse.protocol import IngestEvent  # noqa: E402
from pulse.storage.model import DAY_MS, IngestJob  # noqa: E402
from pulse.storage.sqlite.connection import connect  # noqa: E402
from pulse.storage.sqlite.writer import EventWriter  # noqa: E402

AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile "
    "Safari/537.36",
]
NAMES = ["page_view"] * 20 + [f"event_{i:02d}" for i in range(49)]
PAGES = [f"/page/{i}" for i in range(40)]
REFERRERS = [None, None, "https://www.google.com/", "https://twitter.com/", "https://news.ycombinator.com/"]


async def load(path: Path, events: int, days: int = 30, users: int = 100_000, sessions: int = 300_000,
               writer: EventWriter | None = None) -> float:
    """Generate and write the month day by day, in time order; returns events/s of the load. `writer`: another
    sink with the writer's start, enqueue and close (bench/cluster.py loads a ClickHouse store with it)."""
    rng = random.Random(1)
    now = int(time.time() * 1000)
    start = now - days * DAY_MS
    per_session = max(1, events // sessions)
    writer = writer or EventWriter(path, max_queued_events=400_000)
    await writer.start()
    traits = [{"age_group": rng.choice(["<18", "18-40", ">40"]), "gender": rng.choice(["Male", "Female", "Other"])}
              for _ in range(users)]
    seen_users: set[int] = set()
    written = 0
    began = time.monotonic()
    for day in range(days):
        day_events: list[tuple[int, int, IngestEvent]] = []
        for number in range(sessions // days):
            user = rng.randrange(users)
            agent = user % len(AGENTS)
            ts = start + day * DAY_MS + rng.randrange(DAY_MS)
            session = f"s{day}-{number}"
            campaign = "?utm_source=newsletter" if number % 4 == 0 else ""  # no random draw: the rest is as before
            if user not in seen_users:
                seen_users.add(user)
                day_events.append((ts, agent, IngestEvent(event="$identify", distinct_id=f"u{user}", session_id=session,
                                                          traits=traits[user], timestamp=ts)))
            for step in range(per_session):
                name = "page_view" if step == 0 else rng.choice(NAMES)
                day_events.append((ts, agent, IngestEvent(
                    event=name, distinct_id=f"u{user}", session_id=session, timestamp=ts,
                    page_url="https://shop.example" + rng.choice(PAGES) + (campaign if step == 0 else ""),
                    referrer=rng.choice(REFERRERS) if step == 0 else None,
                    properties={"plan": rng.choice(["free", "pro"]), "n": step} if name != "page_view" else None,
                )))
                ts += rng.randrange(5_000, 60_000)
        day_events.sort(key=lambda item: item[0])
        futures = []
        for agent in range(len(AGENTS)):
            mine = [event for _, a, event in day_events if a == agent]
            for i in range(0, len(mine), 1000):
                futures.append(writer.enqueue(IngestJob(1, mine[i:i + 1000], now, 0, "192.0.2.1", AGENTS[agent])))
                if len(futures) >= 200:
                    written += sum(a for a, _ in await asyncio.gather(*futures))
                    futures = []
        written += sum(a for a, _ in await asyncio.gather(*futures))
        print(f"\r  loaded day {day + 1}/{days}: {written:,} events", end="", file=sys.stderr, flush=True)
    await writer.close()
    print(file=sys.stderr)
    return written / (time.monotonic() - began)


# the journeys: a 3-step funnel over the month, 8 weeks of retention, the paths from a page
FUNNEL = "funnel?steps=page_view:/page/1,event_01,event_02&window=1d"
RETENTION = "retention?period=week&periods=8"
PATHS = "paths?start=/page/1&depth=3&limit=5"

ENDPOINTS = ["overview", "timeseries?interval=day", "top-events", "pages", "entry-pages", "exit-pages", "referrers",
             "utm?dimension=source", "browsers", "os", "devices", "sessions", "users", "users/u123", "events",
             "properties", "properties/plan", FUNNEL, RETENTION, PATHS]

# the same answers from a plain scan of the raw events (what a store without rollups would run)
_ID = "(SELECT id FROM strings WHERE value = '{}')"
_E = "FROM events e LEFT JOIN agents a ON a.id = e.agent_id WHERE e.project_id = 1 AND e.ts >= ? AND e.ts < ?"
RAW = {
    "overview": f"SELECT count(*), count(DISTINCT e.person_id), count(DISTINCT e.session_id) {_E}",
    "timeseries?interval=day": f"SELECT e.ts / 86400000, count(*), count(DISTINCT e.person_id) {_E} GROUP BY 1",
    "top-events": f"SELECT e.name_id, count(*), count(DISTINCT e.person_id) {_E} GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
    "pages": f"SELECT e.path_id, count(*), count(DISTINCT e.person_id) {_E} GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
    "browsers": f"SELECT a.browser, count(*), count(DISTINCT e.person_id) {_E} GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
    "users/u123": f"SELECT e.* {_E} AND e.person_id = (SELECT person_id FROM person_ids WHERE distinct_id = 'u123')"
                  " ORDER BY e.ts DESC, e.id DESC LIMIT 51",
    # persons at each step: every first step's next steps found by joins of the step events (SQLite indexes the
    # materialized steps itself)
    FUNNEL: f"""WITH st AS MATERIALIZED (SELECT e.person_id AS p, e.ts AS ts, e.name_id AS n, e.path_id AS path {_E}
            AND e.name_id IN (SELECT id FROM strings WHERE value IN ('page_view', 'event_01', 'event_02'))),
        s1 AS (SELECT p, ts FROM st WHERE n = {_ID.format('page_view')} AND path = {_ID.format('/page/1')}),
        s2 AS (SELECT p, ts FROM st WHERE n = {_ID.format('event_01')}),
        s3 AS (SELECT p, ts FROM st WHERE n = {_ID.format('event_02')}),
        r2 AS (SELECT s1.p, s1.ts AS t1, min(s2.ts) AS t2 FROM s1 JOIN s2 ON s2.p = s1.p AND s2.ts > s1.ts
               AND s2.ts <= s1.ts + 86400000 GROUP BY s1.p, s1.ts),
        r3 AS (SELECT r2.p FROM r2 JOIN s3 ON s3.p = r2.p AND s3.ts > r2.t2 AND s3.ts <= r2.t1 + 86400000)
        SELECT (SELECT count(DISTINCT p) FROM s1), (SELECT count(DISTINCT p) FROM r2),
               (SELECT count(DISTINCT p) FROM r3)""",
    # per person the Monday-week of their first event, and who of each such cohort had an event each week after
    RETENTION: f"""WITH ev AS MATERIALIZED (SELECT e.person_id AS p, (e.ts / 86400000 + 3) / 7 AS w {_E}),
        cohort AS (SELECT p, min(w) AS w0 FROM ev GROUP BY p)
        SELECT c.w0, ev.w - c.w0, count(DISTINCT ev.p) FROM cohort c JOIN ev ON ev.p = c.p
        WHERE ev.w - c.w0 < 8 GROUP BY 1, 2""",
    # per session with the page, the next three steps after its first view of it, counted per sequence
    PATHS: f"""WITH ev AS MATERIALIZED (SELECT e.session_id AS s, e.name_id AS n, e.path_id AS path,
            row_number() OVER (PARTITION BY e.session_id ORDER BY e.ts, e.id) AS k {_E} AND e.session_id IN
            (SELECT e.session_id {_E} AND e.name_id = {_ID.format('page_view')} AND e.path_id = {_ID.format('/page/1')})),
        st AS (SELECT s, min(k) AS k0 FROM ev WHERE n = {_ID.format('page_view')} AND path = {_ID.format('/page/1')}
               GROUP BY s)
        SELECT seq, count(*) FROM (SELECT ev.s, group_concat(ev.n || ':' || coalesce(ev.path, ''), '>') AS seq
            FROM ev JOIN st ON st.s = ev.s AND ev.k > st.k0 AND ev.k <= st.k0 + 3 GROUP BY ev.s) GROUP BY seq""",
}


# every endpoint of the per-kind tables: ENDPOINTS and the reports the dashboard adds
ALL_ENDPOINTS = [*ENDPOINTS, "countries", "traits", "goals"]

# the filter kinds of the per-kind tables (values the loaded month has)
KINDS = {
    "none": {},
    "trait.gender": {"trait.gender": "Female"},
    "prop.plan": {"prop.plan": "pro"},
    "path": {"path": "/page/1"},
    "referrer": {"referrer": "google.com"},
    "utm_source": {"utm_source": "newsletter"},
    "browser": {"browser": "Chrome"},
    "os": {"os": "iOS"},
    "device": {"device": "mobile"},
    "event": {"event": "event_07"},
    "two traits": {"trait.age_group": ">40", "trait.gender": "Male"},
    "trait + event": {"trait.gender": "Other", "event": "event_07"},
    "prop + browser + trait": {"prop.plan": "pro", "browser": "Chrome", "trait.gender": "Female"},
}


async def time_endpoints(url: str, token: str, runs: int, filters: dict,
                         endpoints: list[str] = ENDPOINTS) -> dict[str, list[float]]:
    """`runs` requests of each endpoint in turn (ms each); an answer other than 200 is recorded as NaN (with
    its status in `refused`), not timed."""
    timings: dict[str, list[float]] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for endpoint in endpoints:
            path, _, query = endpoint.partition("?")
            params = {"range": "30d", **filters, **dict(p.split("=") for p in query.split("&") if p)}
            for _ in range(runs):
                began = time.perf_counter()
                async with session.get(f"{url}/api/v1/projects/1/{path}", params=params) as response:
                    await response.read()
                    status = response.status
                elapsed = (time.perf_counter() - began) * 1000
                if status != 200:
                    refused[(endpoint, tuple(filters.items()))] = status
                    elapsed = math.nan
                timings.setdefault(endpoint, []).append(elapsed)
    return timings


refused: dict[tuple, int] = {}  # (endpoint, filters) -> the status of an answer other than 200


OTHER_FILTERS = {  # answered from per-person counts, like trait.gender, or by their own scan of the raw events
    "trait.age_group": {"trait.age_group": "18-40"},
    "two traits": {"trait.age_group": ">40", "trait.gender": "Male"},
    "trait + event": {"trait.gender": "Other", "event": "event_07"},
    "prop.plan": {"prop.plan": "pro"},
}


async def first_overviews(url: str, token: str) -> dict[str, float]:
    found = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for name, filters in OTHER_FILTERS.items():
            began = time.perf_counter()
            async with session.get(f"{url}/api/v1/projects/1/overview", params={"range": "30d", **filters}) as response:
                await response.read()
                assert response.status == 200, (name, response.status)
            found[name] = (time.perf_counter() - began) * 1000
    return found


def rss(pid: int) -> str:
    """Resident and peak resident memory of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return f"{int(status['VmRSS'].split()[0]) / 1024:.0f} MiB (peak {int(status['VmHWM'].split()[0]) / 1024:.0f} MiB)"


def columns_size(data_dir: Path) -> int:
    """Bytes of the event columns on disk (`pulse.db-columns/`)."""
    return sum(f.stat().st_size for f in (data_dir / "pulse.db-columns").rglob("*") if f.is_file())


def wait_columns(data_dir: Path, highest: int, server: subprocess.Popen) -> None:
    """Until the columns' manifest says every event of the database is built (the server builds them behind
    its start when the database has none yet)."""
    manifest = data_dir / "pulse.db-columns" / "manifest.json"
    while True:
        try:
            if json.loads(manifest.read_text())["through"] >= highest:
                return
        except (OSError, ValueError, KeyError):
            pass
        if server.poll() is not None:
            raise SystemExit(f"pulse serve exited ({server.returncode}) before its columns were built")
        time.sleep(0.1)


def serve(data_dir: Path, **env: str) -> tuple[subprocess.Popen, str, float]:
    """`pulse serve` on the data directory, once its columns are built and its warm-up done: the process, its
    URL and the seconds from its start until its columns were built."""
    port = free_port()
    began = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "pulse.cli", "serve", "--port", str(port), "--data-dir",
                               str(data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              env={**os.environ, "PULSE_QUERY_TIMEOUT_S": "120", **env})
    try:
        conn = connect(data_dir / "pulse.db", readonly=True)
        highest = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        conn.close()
        wait_columns(data_dir, highest, server)
        built = time.monotonic() - began
        wait_http(port, timeout=120)
        url = f"http://127.0.0.1:{port}"
        while not json.loads(urlopen(f"{url}/health").read())["warmed_up"]:
            time.sleep(0.2)
    except BaseException:
        server.terminate()
        server.wait(60)
        raise
    return server, url, built


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(60)


def time_raw(path: Path, runs: int) -> dict[str, float]:
    conn = connect(path, readonly=True)
    now = int(time.time() * 1000)
    found = {}
    for endpoint, sql in RAW.items():
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            conn.execute(sql, (now - 30 * DAY_MS, now) * (sql.count("?") // 2)).fetchall()  # once per scan
            times.append((time.perf_counter() - began) * 1000)
        found[endpoint] = statistics.median(times)
    conn.close()
    return found


WIDTH = max(len(endpoint) for endpoint in ENDPOINTS)


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cell(value: float, width: int = 8) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5, help="requests per endpoint and filter (at least 2)")
    parser.add_argument("--keep", type=Path, help="reuse (or keep) the loaded data directory here")
    args = parser.parse_args()
    args.runs = max(2, args.runs)

    data_dir = args.keep or Path(tempfile.mkdtemp(prefix="pulse-query-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "pulse.db"
    fresh = not db.exists()
    created = json.loads(subprocess.run(
        [sys.executable, "-m", "pulse.cli", "projects", "create", f"bench{int(time.time())}", "--json",
         "--data-dir", str(data_dir)], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    if fresh:
        assert created["id"] == 1
        print(f"loading {args.events:,} events into {data_dir}", file=sys.stderr)
        rate = asyncio.run(load(db, args.events))
        print(f"loaded at {rate:,.0f} events/s")
    token = subprocess.run(
        [sys.executable, "-m", "pulse.cli", "keys", "rotate", "1", "--read", "--json", "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, cwd=ROOT)
    token = json.loads(token.stdout)["read_token"]
    conn = connect(db, readonly=True)
    counts = conn.execute("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM persons),"
                          " (SELECT count(*) FROM sessions)").fetchone()
    conn.close()
    print(f"{counts[0]:,} events, {counts[1]:,} persons, {counts[2]:,} sessions; "
          f"{sum(f.stat().st_size for f in data_dir.glob('pulse.db*')) / counts[0]:.0f} bytes/event on disk")

    columns_existed = (data_dir / "pulse.db-columns" / "manifest.json").exists()
    # every request a first request: no cache (and so no warm-up to fill it)
    server, url, built = serve(data_dir, PULSE_CACHE_MIB="0", PULSE_WARM_DAYS="0")
    try:
        print(f"event columns {'loaded' if columns_existed else 'built'} {built:.1f}s after the server's start:"
              f" {columns_size(data_dir) / counts[0]:.1f} bytes/event on disk; server RSS {rss(server.pid)}")
        first = {kind: asyncio.run(time_endpoints(url, token, 1, filters, ALL_ENDPOINTS))
                 for kind, filters in KINDS.items()}
        print(f"server RSS after the first requests (no cache) {rss(server.pid)}")
    finally:
        stop(server)

    began = time.monotonic()
    server, url, _ = serve(data_dir)
    try:
        print(f"warm-up at start (the readers' cache of the last 31 days): {time.monotonic() - began:.1f}s;"
              f" server RSS {rss(server.pid)}")
        others = asyncio.run(first_overviews(url, token))  # before anything is cached for those filters
        plain = asyncio.run(time_endpoints(url, token, args.runs, {}))
        filtered = asyncio.run(time_endpoints(url, token, args.runs, {"trait.gender": "Female"}))
        repeated = {kind: asyncio.run(time_endpoints(url, token, args.runs, filters, ALL_ENDPOINTS))
                    for kind, filters in KINDS.items()}
        print(f"server RSS after the requests {rss(server.pid)}")
    finally:
        stop(server)
    raw = time_raw(db, max(1, args.runs // 2))
    print(f"\nrange=30d, {args.runs} requests each over HTTP after the start-up warm-up; filtered: the first"
          " request (nothing cached for that filter) and the repeats; raw: the same answer from a plain scan (median)")
    print(f"{'endpoint':<{WIDTH}} {'p50 ms':>8} {'p95 ms':>8}   {'filtered 1st':>12} {'p50':>8} {'p95':>8}"
          f"   {'raw scan ms':>11} {'raw/p50':>8}")
    for endpoint in ENDPOINTS:
        a, b = plain[endpoint], filtered[endpoint]
        scan = raw.get(endpoint)
        ratio = f"{scan / p(a, 0.5):>7.0f}x" if scan else ""
        print(f"{endpoint:<{WIDTH}} {p(a, 0.5):>8.1f} {p(a, 0.95):>8.1f}   {b[0]:>12.1f} {p(b[1:], 0.5):>8.1f} "
              f"{p(b[1:], 0.95):>8.1f}   {'' if scan is None else f'{scan:.0f}':>11} {ratio:>8}")
    print("\nthe first overview under other new filters (ms): "
          + ", ".join(f"{name} {ms:,.0f}" for name, ms in others.items()))

    print(f"\nper filter kind, range=30d (ms): 1st = the first request on a server with no cache"
          f" (PULSE_CACHE_MIB=0); served 1st = the first request under that filter on the server as configured"
          f" (after its warm-up; endpoints asked in this order, so later ones reuse what earlier ones kept for the"
          f" filter); p50, p95 = requests 2..{args.runs} there; raw: the plain scan's median, unfiltered")
    for kind, filters in KINDS.items():
        print(f"\n{kind}: " + ("&".join(f"{k}={v}" for k, v in filters.items()) or "no filter"))
        print(f"  {'endpoint':<{WIDTH}} {'1st':>8} {'served 1st':>10} {'p50':>8} {'p95':>8}   {'raw scan ms':>11}")
        for endpoint in ALL_ENDPOINTS:
            cold, warm = first[kind][endpoint][0], repeated[kind][endpoint][1:]
            served = repeated[kind][endpoint][0]
            scan = raw.get(endpoint) if not filters else None
            note = refused.get((endpoint, tuple(filters.items())))
            print(f"  {endpoint:<{WIDTH}} {cell(cold)} {cell(served):>10} {cell(p(warm, 0.5))} {cell(p(warm, 0.95))}   "
                  f"{'' if scan is None else f'{scan:.0f}':>11}" + (f"   (answered {note})" if note else ""))
    if not args.keep:
        shutil.rmtree(data_dir)


if __name__ == "__main__":
    main()
