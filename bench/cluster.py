"""Scaling out: two `pulse serve` nodes on a two-shard ClickHouse 18.16 cluster, beside the SQLite store.

    python bench/cluster.py [--events 10000000] [--duration 10] [--repeat 3] [--runs 20] [--keep DIR]

Starts two clickhouse-server instances on 127.0.0.1 (tests/clickhouse_servers.py's config: one cluster of two
shards, no ZooKeeper; data in a temporary directory, or under --keep) and, in the same run, measures against
one `pulse serve` on SQLite:

- ingest: wrk posts site-shaped batches of 50 events (bench/load.lua) for --duration seconds: to the SQLite
  server with one wrk (1 thread, 64 connections), to the two cluster nodes at once with two wrk processes of 32
  connections each (events/s summed; p99 the larger of the two). Each node enters the cluster on a shard of its
  own (its store URL names that shard first). CPU time (/proc/PID/stat utime+stime) of every pulse process and of
  each ClickHouse server from a run's start until SETTLE_S after it (the merges its inserts set off), per
  million events acknowledged;
- queries: --events events loaded into both stores (bench/query.py's month: SQLite through its loader, the
  cluster through the ClickHouse store's own ingest in this process, or with --ch-load migrate by
  `pulse migrate` from the SQLite copy); then p50/p95 of --runs requests each of overview, timeseries,
  top-events and browsers under path=/page/1 (range=30d) over HTTP, from one node of each;
- a model of ingest and query latency for N nodes and M shards, from those CPU figures, its assumptions printed.

Everything shares this machine's cores: throughput here is the box's, CPU per event is what carries over to
other hardware. Needs wrk and clickhouse-server; loopback only; stops what it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from urllib.request import urlopen

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import HERE, Shape, children, cpu_seconds, free_port, wait_http  # noqa: E402
from bench.query import load, p  # noqa: E402
from pulse.config import Settings  # noqa: E402
from pulse.storage.base import open_store  # noqa: E402
from pulse.storage.model import IngestJob  # noqa: E402
from tests.clickhouse_servers import CLUSTER, MISSING, ClickHouse, start_servers, stop_servers  # noqa: E402

BATCH = 50  # events per ingest request
CONNECTIONS = 64  # wrk connections in all (the site shape of bench/ingest.py), split over the nodes
SETTLE_S = 2.0  # CPU is read until this long after wrk ends: the merges and written-behind rollups it set off
INGEST_DB = "pulse_ingest"
QUERY_DB = "pulse_query"
QUERY_TIMEOUT_S = "600"  # a question over 10 million raw rows on two shared cores may take minutes: time it, not cut it
ENDPOINTS = {  # label: (path, parameters), each over range=30d
    "overview": ("overview", {}),
    "timeseries (day)": ("timeseries", {"interval": "day"}),
    "top-events": ("top-events", {}),
    "browsers, path=/page/1": ("browsers", {"path": "/page/1"}),
}
WIDTH = max(len(label) for label in ENDPOINTS)


# -- processes ------------------------------------------------------------------------------------------------

def cli(*args: str) -> dict:
    """A `pulse` command's --json answer."""
    return json.loads(subprocess.run([sys.executable, "-m", "pulse.cli", *args, "--json"], capture_output=True,
                                     text=True, check=True, cwd=ROOT).stdout)


def serve(data_dir: Path, *options: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "pulse.cli", "serve", "--port", str(port), "--data-dir",
                                str(data_dir), *options], cwd=ROOT, stdout=subprocess.DEVNULL,
                               env={**os.environ, "PULSE_QUERY_TIMEOUT_S": QUERY_TIMEOUT_S})
    wait_http(port)
    url = f"http://127.0.0.1:{port}"
    while True:  # listening is not serving yet: the store opens first
        try:
            if json.loads(urlopen(f"{url}/health").read())["warmed_up"]:
                return process, port
        except (OSError, ValueError):
            pass
        if process.poll() is not None:
            raise RuntimeError(f"pulse serve {' '.join(options)} exited with {process.returncode}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def store_url(servers: list[ClickHouse], db: str, first: int = 0) -> str:
    """The cluster's store URL, naming shard `first` first: the shard this node sends its inserts and questions
    to (which spreads the Distributed tables' fan-out and merging over the shards)."""
    order = servers[first:] + servers[:first]
    return f"clickhouse://{','.join(f'127.0.0.1:{s.http_port}' for s in order)}/{db}?cluster={CLUSTER}"


def ch_select(server: ClickHouse, sql: str) -> str:
    with urlopen(f"{server.url}/?{urllib.parse.urlencode({'query': sql})}", timeout=600) as response:
        return response.read().decode()


def ch_execute(server: ClickHouse, sql: str) -> None:
    with urlopen(urllib.request.Request(server.url, data=sql.encode()), timeout=600) as response:
        response.read()


def stored_events(servers: list[ClickHouse], db: str) -> int:
    """Events in `db` on every shard (0 when there is no such database yet)."""
    try:
        return sum(int(ch_select(server, f"SELECT count() FROM {db}.events")) for server in servers)
    except urllib.error.HTTPError:
        return 0


# -- ingest ---------------------------------------------------------------------------------------------------

def wrk_at_once(ports: list[int], key: str, duration: float, seed: int, watched: list[int]) -> dict:
    """One wrk process per port, all at once, CONNECTIONS split among them; the CPU seconds each watched
    process used from the start until SETTLE_S after the last wrk ended."""
    env = {**os.environ, "PULSE_BATCH": str(BATCH), "PULSE_KEY": key, "PULSE_FORMAT": "native",
           "PULSE_SHAPE": "site", "PULSE_SEED": str(seed)}
    shape = Shape("site", 1, CONNECTIONS // len(ports), seed)
    before = {pid: cpu_seconds(pid) for pid in watched}
    runs = [subprocess.Popen(["wrk", f"-t{shape.threads}", f"-c{shape.connections}", f"-d{duration:g}s", "-s",
                              str(HERE / "load.lua"), f"http://127.0.0.1:{port}"],
                             stdout=subprocess.PIPE, text=True, env=env) for port in ports]
    outputs = [run.communicate()[0] for run in runs]
    time.sleep(SETTLE_S)
    cpu = {pid: cpu_seconds(pid) - start for pid, start in before.items()}
    found = {"eps": 0.0, "p99_ms": 0.0, "bad": 0, "events": 0}
    for out, run in zip(outputs, runs):
        if run.returncode:
            raise RuntimeError(f"wrk exited with {run.returncode}")
        line = next(line for line in out.splitlines() if line.startswith("RESULT"))
        requests, micros, _, p99, bad_status, socket_errors = map(int, line.split()[1:])
        found["eps"] += requests * BATCH / (micros / 1e6)
        found["p99_ms"] = max(found["p99_ms"], p99 / 1000)
        found["bad"] += bad_status + socket_errors
        found["events"] += (requests - bad_status) * BATCH
    found["cpu"] = cpu
    return found


def ingest_part(args: argparse.Namespace, servers: list[ClickHouse], work: Path) -> dict:
    for server in servers:
        ch_execute(server, f"DROP DATABASE IF EXISTS {INGEST_DB}")
    sqlite_key = cli("projects", "create", "bench", "--data-dir", str(work / "ingest-sqlite"))["ingest_key"]
    cluster_key = cli("projects", "create", "bench", "--store", store_url(servers, INGEST_DB),
                      "--data-dir", str(work / "ingest-cli"))["ingest_key"]
    sqlite, sqlite_port = serve(work / "ingest-sqlite")
    nodes = [serve(work / f"node{i}", "--store", store_url(servers, INGEST_DB, i)) for i in range(len(servers))]
    node_pids = [node.pid for node, _ in nodes]
    shard_pids = [server.process.pid for server in servers]
    sqlite_pids = [sqlite.pid, *children(sqlite.pid)]  # the server and its writer process
    if len(sqlite_pids) != 2:
        raise RuntimeError(f"expected one writer process under pulse serve, found {sqlite_pids[1:]}")
    runs: dict[str, list[dict]] = {"sqlite": [], "cluster": []}
    try:
        wrk_at_once([sqlite_port], sqlite_key, 1, args.seed, sqlite_pids)  # warm up both
        wrk_at_once([port for _, port in nodes], cluster_key, 1, args.seed, node_pids)
        for _ in range(args.repeat):  # interleaved, so both see the same machine noise
            runs["sqlite"].append(wrk_at_once([sqlite_port], sqlite_key, args.duration, args.seed, sqlite_pids))
            runs["cluster"].append(wrk_at_once([port for _, port in nodes], cluster_key, args.duration, args.seed,
                                               node_pids + shard_pids))
    finally:
        for node, _ in nodes:
            stop(node)
        stop(sqlite)
    results = {}
    for name, found in runs.items():
        events = sum(run["events"] for run in found)
        per_million = lambda pids: sum(run["cpu"][pid] for run in found for pid in pids) / events * 1e6  # noqa: E731
        results[name] = {"eps": statistics.median(run["eps"] for run in found),
                         "p99_ms": statistics.median(run["p99_ms"] for run in found),
                         "bad": sum(run["bad"] for run in found), "events": events}
        if name == "sqlite":
            results[name]["server_cpu"], results[name]["writer_cpu"] = (per_million([pid]) for pid in sqlite_pids)
        else:
            results[name]["node_cpu"] = [per_million([pid]) for pid in node_pids]
            results[name]["shard_cpu"] = [per_million([pid]) for pid in shard_pids]
    return results


# -- queries --------------------------------------------------------------------------------------------------

class StoreWriter:
    """What bench/query.py's loader asks of its writer (start, enqueue, close), done by the ClickHouse store's own
    ingest in this process: the group commits `pulse serve --store clickhouse://…` makes (persons, sessions,
    the uuid lookup, RowBinary inserts through the Distributed tables, confirmed by every shard)."""

    def __init__(self, settings: Settings) -> None:
        self.store = open_store(settings)

    async def start(self) -> None:
        await self.store.__aenter__()

    def enqueue(self, job: IngestJob) -> asyncio.Future:
        return self.store.enqueue(job)

    async def close(self) -> None:
        await self.store.__aexit__(None, None, None)


def load_sqlite(args: argparse.Namespace, data_dir: Path) -> str:
    """bench/query.py's month in `data_dir` (kept when it is there); a read token of project 1."""
    db = data_dir / "pulse.db"
    if not db.exists():
        assert cli("projects", "create", "bench", "--data-dir", str(data_dir))["id"] == 1
        print(f"loading {args.events:,} events into {data_dir}", file=sys.stderr)
        rate = asyncio.run(load(db, args.events))
        print(f"SQLite: loaded through the writer (bench/query.py's loader) at {rate:,.0f} events/s")
    return cli("keys", "rotate", "1", "--read", "--data-dir", str(data_dir))["read_token"]


def load_cluster(args: argparse.Namespace, servers: list[ClickHouse], sqlite_dir: Path, work: Path) -> str:
    """The same month in the cluster's QUERY_DB (kept when it holds events); a read token of project 1."""
    url = store_url(servers, QUERY_DB)
    held = stored_events(servers, QUERY_DB)
    if held:
        print(f"cluster: {held:,} events already in {QUERY_DB}, kept")
    elif args.ch_load == "ingest":
        assert cli("projects", "create", "bench", "--store", url, "--data-dir", str(work / "query-cli"))["id"] == 1
        print(f"loading {args.events:,} events into the cluster", file=sys.stderr)
        settings = Settings(data_dir=work / "query-cli", store=url, queue_max_events=400_000)
        rate = asyncio.run(load(Path(), args.events, writer=StoreWriter(settings)))
        print(f"cluster: loaded through the ClickHouse store's ingest (its group commit, in this process; the same"
              f" generator as SQLite's) at {rate:,.0f} events/s")
    else:
        began = time.monotonic()
        subprocess.run([sys.executable, "-m", "pulse.cli", "migrate", "--to", url, "--data-dir", str(sqlite_dir)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"cluster: loaded by `pulse migrate` from the SQLite copy (RowBinary inserts of fully prepared rows,"
              f" 10,000 a batch) at {stored_events(servers, QUERY_DB) / (time.monotonic() - began):,.0f} events/s")
    return cli("keys", "rotate", "1", "--read", "--store", url, "--data-dir", str(work / "query-cli"))["read_token"]


async def time_queries(url: str, token: str, runs: int, watched: list[int]) -> dict:
    """Per endpoint: the time of the first request and of `runs` more (ms), and the CPU seconds per request each
    watched process spent on them; and the overview over every loaded event."""
    found = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:  # the server's limit
        for label, (path, extra) in ENDPOINTS.items():
            params = {"range": "30d", **extra}
            times = []
            before = {pid: cpu_seconds(pid) for pid in watched}
            for _ in range(runs + 1):
                began = time.perf_counter()
                async with session.get(f"{url}/api/v1/projects/1/{path}", params=params) as response:
                    body = await response.read()
                    assert response.status == 200, (label, response.status, body[:300])
                times.append((time.perf_counter() - began) * 1000)
            cpu = {pid: (cpu_seconds(pid) - start) / (runs + 1) for pid, start in before.items()}
            found[label] = {"times": times[1:], "first": times[0], "cpu": cpu}
        # every loaded event, whenever it was loaded (the stores were loaded a while apart: their 30 days differ)
        async with session.get(f"{url}/api/v1/projects/1/overview", params={"range": "90d"}) as response:
            body = await response.json()
            found["all"] = [body[k] for k in ("events", "unique_users", "sessions")]
    return found


def query_part(args: argparse.Namespace, servers: list[ClickHouse], keep: Path, work: Path) -> dict:
    sqlite_dir = keep / "sqlite"
    sqlite_dir.mkdir(parents=True, exist_ok=True)
    sqlite_token = load_sqlite(args, sqlite_dir)
    cluster_token = load_cluster(args, servers, sqlite_dir, work)
    results = {}
    server, port = serve(sqlite_dir)
    try:
        results["sqlite"] = asyncio.run(time_queries(f"http://127.0.0.1:{port}", sqlite_token, args.runs,
                                                     [server.pid]))
    finally:
        stop(server)
    node, port = serve(work / "query-node", "--store", store_url(servers, QUERY_DB))
    try:
        results["cluster"] = asyncio.run(time_queries(f"http://127.0.0.1:{port}", cluster_token, args.runs,
                                                      [node.pid, *(s.process.pid for s in servers)]))
        results["node_pid"] = node.pid
    finally:
        stop(node)
    results["events"] = stored_events(servers, QUERY_DB)
    return results


# -- report ---------------------------------------------------------------------------------------------------

def print_ingest(args: argparse.Namespace, found: dict) -> None:
    print(f"== ingest: batches of {BATCH} events (site shape), wrk with {CONNECTIONS} connections in all,"
          f" {args.duration:g}s per run, median of {args.repeat}")
    print(f"{'store':<28} {'events/s':>9} {'p99 ms':>7} {'non-202':>7} {'events acked':>12}")
    for name, label in (("sqlite", "SQLite, 1 pulse serve"), ("cluster", "ClickHouse, 2 nodes, 2 shards")):
        r = found[name]
        print(f"{label:<28} {r['eps']:>9,.0f} {r['p99_ms']:>7.1f} {r['bad']:>7,} {r['events']:>12,}")
    s, c = found["sqlite"], found["cluster"]
    print(f"CPU-seconds per million events acked (= µs per event), from each run's start until {SETTLE_S:g}s after:")
    print(f"  SQLite      server {s['server_cpu']:>6.1f}   writer {s['writer_cpu']:>6.1f}")
    print(f"  cluster     nodes  {' + '.join(f'{x:.1f}' for x in c['node_cpu'])} = {sum(c['node_cpu']):.1f}"
          f"   shards {' + '.join(f'{x:.1f}' for x in c['shard_cpu'])} = {sum(c['shard_cpu']):.1f}")


def print_queries(args: argparse.Namespace, found: dict) -> None:
    print(f"\n== queries: {found['events']:,} events over 30 days, range=30d; the first request apart, then"
          f" p50/p95 of {args.runs} more (ms), over HTTP from one node; CPU ms per request")
    print(f"{'endpoint':<{WIDTH}}  {'SQLite 1st':>10} {'p50':>7} {'p95':>7}  {'cluster 1st':>11} {'p50':>7} {'p95':>7}"
          f"  {'node cpu':>8} {'shards cpu':>10}")
    node = found["node_pid"]
    for label in ENDPOINTS:
        a, b = found["sqlite"][label], found["cluster"][label]
        shards = sum(cpu for pid, cpu in b["cpu"].items() if pid != node)
        print(f"{label:<{WIDTH}}  {a['first']:>10.1f} {p(a['times'], 0.5):>7.1f} {p(a['times'], 0.95):>7.1f}"
              f"  {b['first']:>11.1f} {p(b['times'], 0.5):>7.1f} {p(b['times'], 0.95):>7.1f}"
              f"  {b['cpu'][node] * 1000:>8.1f} {shards * 1000:>10.1f}")
    a, b = found["sqlite"]["all"], found["cluster"]["all"]
    print(f"overview over every loaded event (range=90d: events, users, sessions): SQLite {a}, cluster {b}"
          f" ({'equal' if a == b else 'DIFFERENT'})")


SCALE = (1, 2, 4, 8)


def print_model(args: argparse.Namespace, ingest: dict | None, queries: dict | None) -> None:
    print("\n== a model of scaling out, from the figures above")
    if ingest is not None:
        s, c = ingest["sqlite"], ingest["cluster"]
        node_us, shard_us = sum(c["node_cpu"]), sum(c["shard_cpu"])
        print(f"ingest events/s ≈ min(N × 1 core / {node_us:.1f} µs,"
              f" M × {args.shard_cores} cores / {shard_us:.1f} µs)")
        print("  assumes: a pulse node is one process (one event loop) and so uses at most one core: run one per core;"
              " the µs are CPU per event measured here (nodes summed, shards summed); events spread evenly over"
              " the shards (by sipHash64 of the person); ClickHouse puts --shard-cores cores to work on inserts"
              " from many nodes; the load balancer, network and disks are not the limit")
        print(f"  SQLite's ceiling, one server and one writer process: min(1 / {s['server_cpu']:.1f} µs,"
              f" 1 / {s['writer_cpu']:.1f} µs) ≈ {1e6 / max(s['server_cpu'], s['writer_cpu']):,.0f} events/s")
        print(f"{'nodes N':>8} " + " ".join(f"{f'M={m}':>10}" for m in SCALE))
        for n in SCALE:
            print(f"{n:>8} " + " ".join(f"{min(n * 1e6 / node_us, m * args.shard_cores * 1e6 / shard_us):>10,.0f}"
                                        for m in SCALE))
    if queries is not None:
        node = queries["node_pid"]
        print(f"\nquery latency ≈ W / (M × c) + O, c = {args.shard_cores} cores a shard gives one query"
              " (ClickHouse's max_threads)")
        print("  assumes: W = the shards' CPU per request measured here, split evenly over M shards; O = what does not"
              " split (the node's work, the entry shard's merge of the shards' results, HTTP) = p50 here − W / 2 (two"
              " shards on this machine's 2 cores: c = 1 here), taken as constant in M (for unique counts it grows"
              " with M: the entry shard merges M sets of users); W grows with N events, O does not")
        print(f"{'endpoint':<{WIDTH}} {'W ms':>7} {'O ms':>7} " + " ".join(f"{f'M={m}':>8}" for m in SCALE))
        for label in ENDPOINTS:
            b = queries["cluster"][label]
            work = sum(cpu for pid, cpu in b["cpu"].items() if pid != node) * 1000
            overhead = max(0.0, p(b["times"], 0.5) - work / 2)
            print(f"{label:<{WIDTH}} {work:>7.1f} {overhead:>7.1f} "
                  + " ".join(f"{work / (m * args.shard_cores) + overhead:>8.1f}" for m in SCALE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="events loaded for the query part")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="wrk runs per store (median is printed)")
    parser.add_argument("--runs", type=int, default=20, help="requests per endpoint after the first (at least 2)")
    parser.add_argument("--seed", type=int, default=1, help="wrk's random seed")
    parser.add_argument("--keep", type=Path,
                        help="reuse (or keep) the loaded SQLite data and the ClickHouse servers' data here")
    parser.add_argument("--ch-load", choices=("ingest", "migrate"), default="ingest",
                        help="how the cluster is loaded: its store's ingest, or pulse migrate from the SQLite copy")
    parser.add_argument("--shard-cores", type=int, default=4, help="cores per ClickHouse shard, for the model")
    parser.add_argument("--part", choices=("all", "ingest", "query"), default="all", help="which benchmarks to run")
    args = parser.parse_args()
    args.runs = max(2, args.runs)
    if MISSING is not None:
        sys.exit(MISSING)
    if shutil.which("wrk") is None and args.part != "query":
        sys.exit("bench/cluster.py needs wrk: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="pulse-cluster-"))
    keep = args.keep or work
    servers = start_servers(keep / "clickhouse", 2)
    ingest = queries = None
    try:
        if args.part != "query":
            ingest = ingest_part(args, servers, work)
            print_ingest(args, ingest)
        if args.part != "ingest":
            queries = query_part(args, servers, keep, work)
            print_queries(args, queries)
    finally:
        stop_servers(servers)
        shutil.rmtree(work)
    print_model(args, ingest, queries)


if __name__ == "__main__":
    main()
