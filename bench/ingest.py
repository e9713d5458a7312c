"""Ingest benchmark: pulse against a bare aiohttp floor over HTTP, and the writer against plain executemany.

    python bench/ingest.py [--shape site|busy|all] [--duration 5] [--repeat 3]

Two shapes of traffic: `site` (~2000 sessions open at once, returning users: what the writer keeps in memory
covers most events) and `busy` (each event a random user of 100,000 and a random session of 200,000, one of
1,000 user agents a request, 8 pages, 5 referrers, reproducible with --seed; wrk with 2 threads and 50
connections): most events belong to a visitor or session the writer has not seen in a while.

Needs wrk (Debian package `wrk`) as the load generator; everything runs on 127.0.0.1 and stops by itself.
Figures are medians of --repeat runs; ratios compare with a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from pulse.protocol import IngestEvent  # noqa: E402
from pulse.storage.model import HOUR_MS, IngestJob  # noqa: E402
from pulse.storage.sqlite.connection import connect  # noqa: E402
from pulse.storage.sqlite.rows import time_uuid  # noqa: E402
from pulse.storage.sqlite.schema import migrate  # noqa: E402
from pulse.storage.sqlite.writer import EventWriter  # noqa: E402

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def children(pid: int) -> list[int]:
    """A process's children (pulse's: its writer process)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _memory_mb(pid: int, path: str, field: str) -> float:
    """A memory field summed over a process and its children, in MB."""
    total = 0.0
    for each in [pid, *children(pid)]:
        for line in Path(f"/proc/{each}/{path}").read_text().splitlines():
            if line.startswith(field):
                total += int(line.split()[1]) / 1024
    return total


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of the server and its writer process: pages both map are counted twice."""
    return _memory_mb(pid, "status", "VmHWM:")


def pss_mb(pid: int) -> float:
    """Proportional set size of the server and its writer process: each shared page counted once."""
    return _memory_mb(pid, "smaps_rollup", "Pss:")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakSize(threading.Thread):
    """The largest size a file had, sampled every 20 ms until stopped (the WAL during a wrk run)."""

    def __init__(self, path: Path | None) -> None:
        super().__init__(daemon=True)
        self.path, self.peak, self.stopping = path, 0, threading.Event()

    def run(self) -> None:
        while self.path is not None and not self.stopping.wait(0.02):
            try:
                self.peak = max(self.peak, self.path.stat().st_size)
            except FileNotFoundError:
                pass

    def __enter__(self) -> PeakSize:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.join()


class Shape:
    """How wrk sends one shape of traffic (see load.lua)."""

    def __init__(self, name: str, threads: int, connections: int, seed: int) -> None:
        self.name, self.threads, self.connections, self.seed = name, threads, connections, seed


def wrk(port: int, batch: int, key: str, duration: float, shape: Shape, server_pid: int,
        wal: Path | None = None, fmt: str = "native", site: str = "") -> dict:
    """One wrk run; also the CPU time per request of the server and, for pulse, of its writer per event, and
    the peak size of its WAL file during the run. `fmt`: the body's format (see load.lua)."""
    env = {**os.environ, "PULSE_BATCH": str(batch), "PULSE_KEY": key, "PULSE_FORMAT": fmt, "PULSE_SITE": site,
           "PULSE_SHAPE": shape.name, "PULSE_SEED": str(shape.seed)}
    pids = [server_pid, *children(server_pid)]
    before = [cpu_seconds(pid) for pid in pids]
    with PeakSize(wal) as wal_size:
        out = subprocess.run(
            ["wrk", f"-t{shape.threads}", f"-c{shape.connections}", f"-d{duration:g}s", "-s", str(HERE / "load.lua"),
             f"http://127.0.0.1:{port}"],
            capture_output=True, text=True, env=env, check=True,
        ).stdout
    used = [cpu_seconds(pid) - start for pid, start in zip(pids, before)]
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    requests, micros, p50, p99, bad_status, socket_errors = map(int, line.split()[1:])
    seconds = micros / 1e6
    return {"rps": requests / seconds, "eps": requests * batch / seconds, "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "bad": bad_status + socket_errors, "server_us": used[0] / requests * 1e6,
            "writer_us": sum(used[1:]) / (requests * batch) * 1e6, "wal_mb": wal_size.peak / 1e6}


def median_runs(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def batches(fmt: str) -> tuple[int, ...]:
    """Plausible's API takes one event a request."""
    return (1,) if fmt == "plausible" else (1, 10, 50)


def http_benchmarks(duration: float, repeat: int, shape: Shape, fmt: str = "native") -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="pulse-bench-"))
    created = json.loads(subprocess.run(
        [sys.executable, "-m", "pulse.cli", "projects", "create", "bench", "--domain", "shop.example", "--json",
         "--data-dir", str(data_dir)], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    key, site = created["ingest_key"], created.get("site_id", "")
    pulse_port, floor_port = free_port(), free_port()
    pulse = subprocess.Popen([sys.executable, "-m", "pulse.cli", "serve", "--port", str(pulse_port),
                              "--data-dir", str(data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL)
    floor = subprocess.Popen([sys.executable, str(HERE / "floor_server.py"), str(floor_port)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results: dict = {"wal_peak_mb": 0.0}
    wal = data_dir / "pulse.db-wal"
    try:
        wait_http(pulse_port)
        wait_http(floor_port)
        for port, pid in ((pulse_port, pulse.pid), (floor_port, floor.pid)):  # warm up both
            wrk(port, 10, key, 1, shape, pid)
        for batch in (1, 10, 50):
            runs: dict[str, list[dict]] = {"pulse": [], "floor": []}
            if fmt != "native" and batch in batches(fmt):
                runs[fmt] = []
            for _ in range(repeat):  # interleaved, so all see the same machine noise
                runs["pulse"].append(wrk(pulse_port, batch, key, duration, shape, pulse.pid, wal))
                results["wal_peak_mb"] = max(results["wal_peak_mb"], runs["pulse"][-1]["wal_mb"])
                results["pss_mb"] = max(results.get("pss_mb", 0.0), pss_mb(pulse.pid))
                runs["floor"].append(wrk(floor_port, batch, key, duration, shape, floor.pid))
                if fmt in runs:
                    runs[fmt].append(wrk(pulse_port, batch, key, duration, shape, pulse.pid, wal, fmt, site))
            results[batch] = {name: median_runs(r) for name, r in runs.items()}
        results["rss_mb"] = peak_rss_mb(pulse.pid)
    finally:
        floor.send_signal(signal.SIGTERM)
        pulse.send_signal(signal.SIGTERM)
        floor.wait(30)
        results["exit_code"] = pulse.wait(60)
    conn = connect(data_dir / "pulse.db")
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = sum(p.stat().st_size for p in data_dir.glob("pulse.db*"))
    results["events_stored"] = events
    results["bytes_per_event"] = size / max(events, 1)
    shutil.rmtree(data_dir)
    return results


# -- the writer alone, against plain executemany ----------------------------------------------------


def make_events(count: int, rng: random.Random, base: int, *, random_uuids: bool = False) -> list[IngestEvent]:
    """Traffic shaped like a site's: ~2000 sessions open at once, ~8 events each, users who come back.

    Event uuids are time-ordered (UUIDv7, as the server makes them and as the SDK sends them), or
    random UUIDv4 with random_uuids (what some backends send).
    """
    names = ["page_view", "page_view", "page_view", "click", "signup", "purchase"]
    open_sessions: list[list] = []
    session_serial = 0
    events = []
    for i in range(count):
        if len(open_sessions) < 2000 or rng.random() < 0.12:
            session_serial += 1
            user = rng.randrange(100_000) if rng.random() < 0.3 else 100_000 + session_serial
            open_sessions.append([f"u{user}", f"s{session_serial}", rng.randint(2, 14)])
        slot = rng.randrange(len(open_sessions))
        session = open_sessions[slot]
        session[2] -= 1
        if session[2] <= 0:
            open_sessions[slot] = open_sessions[-1]
            open_sessions.pop()
        ts = base + i * (6 * HOUR_MS) // count
        events.append(IngestEvent(
            event=rng.choice(names), uuid=uuid.uuid4() if random_uuids else uuid.UUID(bytes=time_uuid(ts)),
            distinct_id=session[0], session_id=session[1],
            page_url=f"https://shop.example/p/{rng.randrange(1, 41)}", referrer="https://www.google.com/",
            properties={"plan": "pro", "n": i % 50}, timestamp=ts,
        ))
    return events



BUSY_REFERRERS = ("https://www.google.com/", "https://news.ycombinator.com/item", "https://t.co/x",
                  "https://www.bing.com/search", "https://duckduckgo.com/")


def busy_agent(n: int) -> str:
    """One of 1,000 user agents (load.lua's, for the writer alone)."""
    version = 60 + n // 4 % 250
    return (f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{version}.0.{n}.0 Safari/537.36")


def make_busy_events(count: int, rng: random.Random, base: int, *, random_uuids: bool = False) -> list[IngestEvent]:
    """A busy site's traffic: each event a random user of 100,000 and a random session of 200,000."""
    names = ["page_view", "page_view", "page_view", "click", "signup", "purchase"]
    events = []
    for i in range(count):
        ts = base + i * (6 * HOUR_MS) // count
        events.append(IngestEvent(
            event=rng.choice(names), uuid=uuid.uuid4() if random_uuids else uuid.UUID(bytes=time_uuid(ts)),
            distinct_id=f"u{rng.randrange(100_000)}", session_id=f"s{rng.randrange(200_000)}",
            page_url=f"https://shop.example/p/{rng.randrange(1, 9)}", referrer=rng.choice(BUSY_REFERRERS),
            properties={"plan": "pro", "n": i % 50}, timestamp=ts,
        ))
    return events


async def writer_rate(path: Path, events: list[IngestEvent], now: int, agents: list[str]) -> float:
    conn = connect(path)
    migrate(conn)
    conn.execute("INSERT INTO projects(name, created_at) VALUES ('bench', 0)")
    conn.close()
    # every job is queued at once: the last waits for all before it, longer than a server's write deadline
    writer = EventWriter(path, max_queued_events=len(events) + 1, batch_max_events=20_000, write_timeout_s=3600)
    await writer.start()
    jobs = [IngestJob(1, events[i:i + 50], now, 0, "192.0.2.1", agents[i // 50 % len(agents)])
            for i in range(0, len(events), 50)]
    started = time.perf_counter()
    futures = []
    for i, job in enumerate(jobs):
        futures.append(writer.enqueue(job))
        if i % 20 == 19:  # hand over what is prepared, as the server does each event-loop turn
            await asyncio.sleep(0)
    results = await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await writer.close()
    assert sum(a for a, _ in results) == len(events)
    return len(events) / elapsed


PLAIN_ROLLUP = """
CREATE TABLE plain_hourly (project_id INTEGER, hour INTEGER, name_id INTEGER, events INTEGER,
                           PRIMARY KEY (project_id, hour, name_id)) WITHOUT ROWID;
CREATE TABLE plain_hourly_users (project_id INTEGER, hour INTEGER, name_id INTEGER, distinct_id TEXT,
                                 PRIMARY KEY (project_id, hour, name_id, distinct_id)) WITHOUT ROWID;
CREATE TABLE plain_hourly_sessions (project_id INTEGER, hour INTEGER, name_id INTEGER, session TEXT,
                                    PRIMARY KEY (project_id, hour, name_id, session)) WITHOUT ROWID;
"""


def plain_rate(path: Path, events: list[IngestEvent], now: int, *, uniques: bool = False) -> float:
    """The same rows through one executemany per 5000 rows, plus a per-row hourly count upsert; with
    `uniques`, also the members of each hour's unique users and sessions (INSERT OR IGNORE), which is
    what an exact hourly rollup of count, unique users and unique sessions takes in plain SQL."""
    conn = connect(path)
    migrate(conn)
    conn.execute(PLAIN_ROLLUP)
    names = {name: i + 1 for i, name in enumerate(sorted({e.event for e in events}))}
    rows = [
        (i + 1, 1, e.uuid.bytes, e.timestamp, now, names[e.event], i % 100_000, i % 300_000, i % 40, i % 40, 1, 2, 1,
         b"\x00" * 8, '{"plan":"pro","n":1}', None, None, None)
        for i, e in enumerate(events)
    ]
    keys = [(1, e.timestamp // HOUR_MS, names[e.event]) for e in events]
    users = [(*key, e.distinct_id) for key, e in zip(keys, events)]
    sessions = [(*key, e.session_id) for key, e in zip(keys, events)]
    started = time.perf_counter()
    for start in range(0, len(rows), 5000):
        end = start + 5000
        with conn:
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[start:end])
            conn.executemany("INSERT INTO plain_hourly VALUES (?, ?, ?, 1) ON CONFLICT DO UPDATE SET events = events + 1",
                             keys[start:end])
            if uniques:
                conn.executemany("INSERT OR IGNORE INTO plain_hourly_users VALUES (?, ?, ?, ?)", users[start:end])
                conn.executemany("INSERT OR IGNORE INTO plain_hourly_sessions VALUES (?, ?, ?, ?)", sessions[start:end])
    elapsed = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed


def storage_benchmarks(count: int, repeat: int, shape: str, seed: int) -> dict:
    """The writer against plain executemany on identical rows: once with time-ordered uuids (the server's
    and the SDK's), once with random UUIDv4 from clients (index inserts all over the uuid index)."""
    rng = random.Random(seed)
    make = make_busy_events if shape == "busy" else make_events
    agents = [busy_agent(n) for n in range(1000)] if shape == "busy" else [CHROME]
    now = int(time.time() * 1000)
    base = now - 6 * HOUR_MS
    runs: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(repeat):
        for kind in ("v7", "v4"):
            events = make(count, rng, base, random_uuids=kind == "v4")
            for uniques in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    runs[f"plain{'+u' * uniques} {kind}"].append(
                        plain_rate(Path(tmp) / "plain.db", events, now, uniques=uniques))
            with tempfile.TemporaryDirectory() as tmp:
                runs[f"writer {kind}"].append(asyncio.run(writer_rate(Path(tmp) / "writer.db", events, now, agents)))
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median is printed)")
    parser.add_argument("--shape", choices=("site", "busy", "all"), default="all", help="which traffic to send")
    parser.add_argument("--seed", type=int, default=1, help="the busy shape's random seed")
    parser.add_argument("--rows", type=int, default=200_000, help="rows for the writer-alone benchmark")
    parser.add_argument("--part", choices=("all", "http", "storage"), default="all", help="which benchmarks to run")
    parser.add_argument("--format", choices=("native", "posthog", "plausible", "umami"), default="native",
                        help="also send the same traffic in this product's format to pulse, next to its own")
    args = parser.parse_args()
    for shape in (("site", "busy") if args.shape == "all" else (args.shape,)):
        print(f"== shape {shape}")
        if args.part != "storage":
            http_part(args, SHAPES[shape](args.seed))
        if args.part != "http":
            storage_part(args, shape)
        print()


SHAPES = {  # wrk's threads and connections: the site shape as it always was, the busy one as specified
    "site": lambda seed: Shape("site", 1, 64, seed),
    "busy": lambda seed: Shape("busy", 2, 50, seed),
}


def http_part(args: argparse.Namespace, shape: Shape) -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench/ingest.py needs wrk: apt-get install wrk")
    print(f"ingest over HTTP: wrk -t{shape.threads} -c{shape.connections}, {args.duration:g}s per run,"
          f" median of {args.repeat}")
    http = http_benchmarks(args.duration, args.repeat, shape, args.format)
    print(f"{'batch':>5}  {'pulse req/s':>11} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'non-202':>7}"
          f"  {'floor req/s':>11} {'events/s':>9} {'p99 ms':>7}  {'pulse/floor':>11}")
    for batch in (1, 10, 50):
        p, f = http[batch]["pulse"], http[batch]["floor"]
        print(f"{batch:>5}  {p['rps']:>11,.0f} {p['eps']:>9,.0f} {p['p50_ms']:>7.2f} {p['p99_ms']:>7.2f} {p['bad']:>7,.0f}"
              f"  {f['rps']:>11,.0f} {f['eps']:>9,.0f} {f['p99_ms']:>7.2f}  {p['rps'] / f['rps']:>10.0%}")
    print("CPU time per request (less noisy than throughput on a shared machine), and of pulse's writer process per event:")
    print(f"{'batch':>5}  {'pulse server':>12} {'floor server':>12} {'floor/pulse':>11}  {'writer per event':>16}")
    for batch in (1, 10, 50):
        p, f = http[batch]["pulse"], http[batch]["floor"]
        print(f"{batch:>5}  {p['server_us']:>9,.1f} us {f['server_us']:>9,.1f} us {f['server_us'] / p['server_us']:>10.0%}"
              f"  {p['writer_us']:>13,.1f} us")
    print(f"pulse peak RSS {http['rss_mb']:.0f} MB summed over server and writer processes (PSS after the"
          f" heaviest run {http['pss_mb']:.0f} MB); exit code after SIGTERM {http['exit_code']}; "
          f"{http['events_stored']:,} events stored, {http['bytes_per_event']:.0f} bytes/event on disk "
          "(events, indexes, rollups, sessions, persons)")
    if args.format != "native":
        print(f"the same traffic in {args.format}'s format to the same server, interleaved with pulse's own:")
        print(f"{'batch':>5}  {'native ev/s':>11} {args.format + ' ev/s':>15} {'ratio':>6} {'p99 ms':>7}"
              f" {'non-2xx':>7}  {'server us/req':>13}")
        for batch in batches(args.format):
            p, f = http[batch]["pulse"], http[batch][args.format]
            print(f"{batch:>5}  {p['eps']:>11,.0f} {f['eps']:>15,.0f} {f['eps'] / p['eps']:>6.0%} {f['p99_ms']:>7.2f}"
                  f" {f['bad']:>7,.0f}  {f['server_us']:>10,.1f} us")
    print(f"pulse WAL peak size {http['wal_peak_mb']:.1f} MB (sampled every 20 ms during each wrk run); by batch size "
          + ", ".join(f"{batch}: {http[batch]['pulse']['wal_mb']:.1f} MB" for batch in (1, 10, 50)) + " (median of runs)")


def storage_part(args: argparse.Namespace, shape: str) -> None:
    print(f"\nstorage alone: {args.rows:,} events in jobs of 50, median of {args.repeat}")
    print("  writer: events + rollup bitmaps + sessions + persons, group commit, in its process")
    print("  plain:  the same rows through executemany, 5000 per transaction, + hourly count upsert per row")
    print("  plain+u: plain, + INSERT OR IGNORE of each row's user and session into the hour's unique members")
    storage = storage_benchmarks(args.rows, args.repeat, shape, args.seed)
    for kind, label in (("v7", "time-ordered uuids"), ("v4", "random client uuids")):
        writer, plain, plain_u = storage[f"writer {kind}"], storage[f"plain {kind}"], storage[f"plain+u {kind}"]
        print(f"  {label:<20}  writer {writer:>9,.0f} events/s   plain {plain:>9,.0f} rows/s ({writer / plain:.0%})"
              f"   plain+u {plain_u:>9,.0f} rows/s ({writer / plain_u:.0%})")


if __name__ == "__main__":
    main()
