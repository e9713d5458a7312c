"""Live feed under load: the dashboard open under Textual's pilot while events pour in.

    python bench/tui.py [--rate 2000] [--seconds 20]

Starts `pulse serve` on a fresh data directory, opens the dashboard of a project in this process (headless,
160x48), and has a separate sender process post `--rate` events/s in batches of 100 for `--seconds`.
Prints the feed's lag (event sent -> painted on screen; an upper bound of commit -> screen) as p50/p95/p99,
and this process's CPU share (the app and its client alone: server and sender are other processes), against a
baseline measured in the same run: the same dashboard open for the same time with no traffic.
Targets: p99 lag under 1 s, the app under 50 % of one core. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, wait_http  # noqa: E402
from pulse.tui.app import PulseApp  # noqa: E402
from pulse.tui.client import PulseClient  # noqa: E402
from pulse.tui.screens.dashboard import DashboardScreen  # noqa: E402
from pulse.tui.state import FilterMemory  # noqa: E402
from pulse.tui.widgets.live_feed import LiveFeed  # noqa: E402

TOKEN = "sk_local_bench"
BATCH = 100


async def send(url: str, key: str, rate: int, seconds: float) -> None:
    """Post `rate` events/s, each stamped with its send time, until `seconds` have passed."""
    interval = BATCH / rate
    sent = 0
    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < seconds:
            now = time.time_ns() // 1_000_000
            events = [{"event": "page_view" if i % 3 else "click", "distinct_id": f"u{(sent + i) % 500}",
                       "page_url": f"https://bench.example/p/{(sent + i) % 40}", "timestamp": now,
                       "properties": {"n": sent + i}} for i in range(BATCH)]
            async with session.post(f"{url}/api/v1/events/ingest", json={"events": events},
                                    headers={"X-API-Key": key}) as response:
                assert response.status == 202, await response.text()
            sent += BATCH
            tick += 1
            delay = start + tick * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    print(json.dumps({"sent": sent}))


async def watch(url: str, key: str, rate: int, seconds: float, memory_dir: Path) -> dict:
    app = PulseApp(PulseClient(url, TOKEN), memory=FilterMemory(memory_dir / "tui.json"), refresh_s=10)
    lags: list[float] = []
    shown = 0
    async with app.run_test(size=(160, 48)) as pilot:
        while not (isinstance(app.screen, DashboardScreen)):
            if getattr(app.screen, "projects", None):
                await pilot.press("enter")
            await pilot.pause(0.1)
        screen = app.screen
        while not screen.query_one("#connection").has_class("-live") or screen.loading:
            await pilot.pause(0.1)
        feed = screen.query_one(LiveFeed)

        def on_shown(events, painted: float) -> None:
            nonlocal shown
            shown += len(events)
            lags.extend(painted * 1000 - e.ts for e in events)

        feed.on_shown = on_shown
        wall, cpu = time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)  # the baseline: the dashboard open, no traffic
        idle = (time.process_time() - cpu) / (time.monotonic() - wall)

        sender = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--send", url, "--key", key, "--rate", str(rate), "--seconds", str(seconds),
            stdout=subprocess.PIPE)
        wall, cpu = time.monotonic(), time.process_time()
        out, _ = await sender.communicate()
        await pilot.pause(1.0)  # the last events reach the screen
        busy = (time.process_time() - cpu) / (time.monotonic() - wall)
        sent = json.loads(out)["sent"]
    lags.sort()
    return {"sent": sent, "shown": shown, "idle_cpu": idle, "busy_cpu": busy,
            "p50": _pct(lags, 50), "p95": _pct(lags, 95), "p99": _pct(lags, 99), "max": lags[-1] if lags else 0}


def _pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--send", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        asyncio.run(send(args.send, args.key, args.rate, args.seconds))
        return

    with tempfile.TemporaryDirectory(prefix="pulse-bench-tui-") as tmp:
        data_dir = Path(tmp) / "data"
        created = json.loads(subprocess.run(
            [sys.executable, "-m", "pulse.cli", "projects", "create", "bench", "--json", "--data-dir", str(data_dir)],
            check=True, capture_output=True, text=True).stdout)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "pulse.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
            env={**os.environ, "PULSE_OPERATOR_TOKEN": TOKEN}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(port)
            time.sleep(0.5)
            runs = [asyncio.run(watch(url, created["ingest_key"], args.rate, args.seconds, Path(tmp)))
                    for _ in range(args.repeat)]
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"live feed at {args.rate:,} events/s for {args.seconds:.0f} s, dashboard open at 160x48 (headless pilot)")
    print(f"{'run':>3}  {'sent':>7}  {'shown':>7}  {'lag p50':>8}  {'p95':>7}  {'p99':>7}  {'max':>7}"
          f"  {'cpu idle':>8}  {'cpu busy':>8}  {'busy/idle':>9}")
    for number, run in enumerate(runs, 1):
        print(f"{number:>3}  {run['sent']:>7,}  {run['shown']:>7,}  {run['p50']:>6.0f}ms  {run['p95']:>5.0f}ms"
              f"  {run['p99']:>5.0f}ms  {run['max']:>5.0f}ms  {run['idle_cpu']:>8.1%}  {run['busy_cpu']:>8.1%}"
              f"  {run['busy_cpu'] / max(run['idle_cpu'], 1e-9):>8.1f}x")
    p99 = statistics.median(r["p99"] for r in runs)
    cpu = statistics.median(r["busy_cpu"] for r in runs)
    print(f"median p99 lag {p99:.0f} ms (target < 1000 ms): {'met' if p99 < 1000 else 'MISSED'}; "
          f"median app CPU {cpu:.1%} of one core (target < 50%): {'met' if cpu < 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
