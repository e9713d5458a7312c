"""scripts/seed_events.py against a real server: a dashboard-worthy week whose totals the API agrees with."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from pulse.seed import generate
from tests.servers import Server, pulse

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


async def test_seed_script_totals_equal_the_api(tmp_path):
    data_dir = tmp_path / "data"
    project = json.loads(pulse("projects", "create", "demo", "--json", data_dir=data_dir).stdout)
    server = Server(data_dir)
    await server.start()
    try:
        sent = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "seed_events.py"), "--url", server.url,
             "--key", project["ingest_key"], "--days", "7", "--seed", "3", "--json"],
            capture_output=True, text=True, check=True, timeout=120,
        )
        summary = json.loads(sent.stdout)
        assert summary["sessions"] >= 3000 and summary["users"] >= 1000
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/api/v1/projects/{project['id']}/overview", params={"range": "30d"},
                                   headers={"Authorization": f"Bearer {project['read_token']}"}) as response:
                overview = await response.json()
            found = {}
            for name in ("top-events", "languages", "screens", "countries", "bots"):
                async with session.get(f"{server.url}/api/v1/projects/{project['id']}/{name}",
                                       params={"range": "30d", "limit": "100"},
                                       headers={"Authorization": f"Bearer {project['read_token']}"}) as response:
                    found[name] = (await response.json())["rows"]
    finally:
        server.stop(15)
    assert (overview["events"], overview["unique_users"], overview["sessions"]) == (
        summary["events"], summary["users"], summary["sessions"])
    assert {row["value"]: row["count"] for row in found["top-events"]} == summary["by_event"]
    # every visitor has a language and a screen; nearly all have a country (a few addresses are in none)
    assert sum(row["count"] for row in found["languages"]) == summary["events"]
    assert sum(row["count"] for row in found["screens"]) == summary["events"]
    assert {row["value"] for row in found["screens"]} == {"mobile", "tablet", "laptop", "desktop"}
    countries = sum(row["count"] for row in found["countries"])
    assert len(found["countries"]) >= 10 and 0.9 * summary["events"] <= countries <= summary["events"]
    # crawlers are in no number above, and all in the bots report
    assert summary["crawler_events"] > 0
    assert sum(row["count"] for row in found["bots"]) == summary["crawler_events"]


def test_same_seed_same_traffic():
    now = int(time.time() * 1000)
    first = [(agent, events) for _, agent, events in generate(7, 2, 50, now)]
    again = [(agent, events) for _, agent, events in generate(7, 2, 50, now)]
    other = [(agent, events) for _, agent, events in generate(8, 2, 50, now)]
    assert first == again and first != other
    assert all(e["timestamp"] < now for _, events in first for e in events)
