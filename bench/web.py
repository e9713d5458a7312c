"""Web dashboard benchmark: the first paint of a 30-day view in Chromium over a month of events.

    python bench/web.py [--events 10000000] [--loads 7] [--keep DIR]

Loads the events as bench/query.py does (through the real writer, 30 days; users and sessions scaled down
for small runs), starts `pulse serve` on that database and waits for its start-up warm-up, makes a share link,
then opens `/dashboard/1?range=30d` in headless Chromium (a fresh page each time) and reads when the cards and
the time chart show their numbers (`window.pulseFirstPaint`: milliseconds from the start of the navigation to
the overview and time series drawn). Prints the first load apart, then the median and the slowest of the
others. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, wait_http  # noqa: E402
from bench.query import load  # noqa: E402
from tests.servers import chromium  # noqa: E402

DAYS = 30
DRAWN_TIMEOUT_MS = 120_000  # a first paint slower than this is a failure, not a figure


def cli(data_dir: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "pulse.cli", *args, "--json", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout)


async def first_paints(url: str, loads: int) -> list[float]:
    """`window.pulseFirstPaint` of each load of the share link, a new page each time."""
    found = []
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        for _ in range(loads):
            page = await context.new_page()
            await page.goto(url)
            await page.wait_for_function("() => window.pulseFirstPaint !== undefined", timeout=DRAWN_TIMEOUT_MS)
            found.append(await page.evaluate("window.pulseFirstPaint"))
            await page.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--loads", type=int, default=7, help="page loads (at least 2: the first is shown apart)")
    parser.add_argument("--keep", type=Path, help="reuse (or keep) the loaded data directory here")
    args = parser.parse_args()
    args.loads = max(2, args.loads)

    data_dir = args.keep or Path(tempfile.mkdtemp(prefix="pulse-web-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "pulse.db"
    fresh = not db.exists()
    if fresh:
        assert cli(data_dir, "projects", "create", "bench")["id"] == 1
        # bench/query.py's month: 100k users and 300k sessions at 10M events, fewer for a small check
        sessions = min(300_000, max(DAYS, args.events // 33))
        users = min(100_000, max(1, sessions // 3))
        print(f"loading {args.events:,} events into {data_dir}", file=sys.stderr)
        rate = asyncio.run(load(db, args.events, days=DAYS, users=users, sessions=sessions))
        print(f"loaded at {rate:,.0f} events/s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    link = cli(data_dir, "share", "create", "1", "--public-url", url)["url"]
    server = subprocess.Popen([sys.executable, "-m", "pulse.cli", "serve", "--port", str(port), "--data-dir",
                               str(data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_http(port)
        while not json.loads(urlopen(f"{url}/health").read())["warmed_up"]:
            time.sleep(0.2)
        paints = asyncio.run(first_paints(link.replace("#", "?range=30d#", 1), args.loads))
    finally:
        server.terminate()
        server.wait(60)
    rest = paints[1:]
    print(f"first paint of the 30-day view (cards and chart drawn), {args.loads} loads after the start-up warm-up:")
    print(f"  first load {paints[0]:.0f} ms; then median {statistics.median(rest):.0f} ms, slowest {max(rest):.0f} ms")
    if not args.keep:
        shutil.rmtree(data_dir)


if __name__ == "__main__":
    main()
