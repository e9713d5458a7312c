"""A real pulse server in this process (same event loop as the app under the pilot), with known data."""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest

from pulse.server.app import create_app
from pulse.tui.state import DashboardQuery, FilterMemory
from tests.server.test_analytics import TZ, generate

OPERATOR = "sk_local_tui_tests"
# the generated population spans 2026-03-01 .. 03-05 (UTC); in Asia/Kolkata these dates hold all of it
POPULATION_QUERY = DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05")


@dataclasses.dataclass
class LiveServer:
    url: str
    project: object
    settings: object
    port: int
    running: object  # the TestServer, to stop it


@pytest.fixture
def tui_settings(settings):
    return dataclasses.replace(settings, operator_token=OPERATOR)


@pytest.fixture
async def server(aiohttp_server, tui_settings, make_project):
    project = make_project("shop", domain="site.example", timezone=TZ)
    running = await aiohttp_server(create_app(tui_settings))
    url = str(running.make_url("")).rstrip("/")
    requests, _, _ = generate()
    async with aiohttp.ClientSession() as session:
        for request in requests:
            async with session.post(f"{url}/api/v1/events/ingest", json={"events": request["events"]},
                                    headers={"X-API-Key": project.ingest_key, "User-Agent": request["agent"]}) as response:
                assert response.status == 202, await response.text()
    return LiveServer(url, project, tui_settings, running.port, running)


@pytest.fixture
def memory(tmp_path) -> FilterMemory:
    return FilterMemory(tmp_path / "config" / "tui.json")
