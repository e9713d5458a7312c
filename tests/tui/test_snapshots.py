"""Snapshots of the projects screen and the dashboard at 80x24 and 160x48, over a real `pulse serve`.

The data are the generated population (fixed dates in March 2026), shown through custom dates, with a
fixed clock: the screens are the same on every run. Update on purpose with `pytest --snapshot-update`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest

from pulse.tui.app import PulseApp
from pulse.tui.client import PulseClient
from pulse.tui.screens.dashboard import DashboardScreen
from pulse.tui.screens.projects import ProjectsScreen
from pulse.tui.state import FilterMemory
from tests.server.test_analytics import TZ, generate
from tests.servers import Server, pulse
from tests.tui.conftest import POPULATION_QUERY
from tests.tui.test_app import until

TOKEN = "sk_local_snapshots"
CLOCK = 1_772_400_000.0  # 2026-03-01T21:20:00Z: "updated …" is the same on every run


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("snapshots") / "data"
    created = json.loads(pulse("projects", "create", "shop", "--domain", "site.example", "--timezone", TZ, "--json",
                               data_dir=data_dir).stdout)
    os.environ["PULSE_OPERATOR_TOKEN"] = TOKEN
    server = Server(data_dir)
    try:
        asyncio.run(_start_and_seed(server, created["ingest_key"]))
    finally:
        del os.environ["PULSE_OPERATOR_TOKEN"]
    yield server, created["id"]
    assert server.stop(signal.SIGTERM) == 0


async def _start_and_seed(server: Server, key: str) -> None:
    await server.start()
    requests, _, _ = generate()
    async with aiohttp.ClientSession() as session:
        for request in requests:
            async with session.post(f"{server.url}/api/v1/events/ingest", json={"events": request["events"]},
                                    headers={"X-API-Key": key, "User-Agent": request["agent"]}) as response:
                assert response.status == 202


def make_app(served, tmp_path) -> PulseApp:
    server, project_id = served
    memory = FilterMemory(tmp_path / "tui.json")
    memory.put(server.url, project_id, POPULATION_QUERY)
    return PulseApp(PulseClient(server.url, TOKEN), memory=memory, refresh_s=3600, clock=lambda: CLOCK)


async def projects_loaded(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, ProjectsScreen) and app.screen.projects, "the projects")
    await pilot.pause()


async def dashboard_loaded(pilot) -> None:
    app = pilot.app
    await projects_loaded(pilot)
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
    screen = app.screen
    await until(pilot, lambda: screen.overview and not screen.loading
                and screen.query_one("#connection").has_class("-live")
                and screen.query_one("#table-pages").row_count > 0, "the numbers")
    await pilot.pause(0.3)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_projects_screen(served, tmp_path, snap_compare, size):
    assert snap_compare(make_app(served, tmp_path), terminal_size=size, run_before=projects_loaded)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_dashboard(served, tmp_path, snap_compare, size):
    assert snap_compare(make_app(served, tmp_path), terminal_size=size, run_before=dashboard_loaded)
