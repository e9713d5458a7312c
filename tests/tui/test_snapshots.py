"""Snapshots of the projects screen (80x24, 160x48) and the dashboard (80x24, 200x50), over a real `pulse serve`.

The data are the generated population (fixed dates in March 2026), shown through custom dates, with a
fixed clock: the screens are the same on every run. Update on purpose with `pytest --snapshot-update`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal

import aiohttp
import pytest

from textual.widgets import DataTable

from pulse.tui.app import PulseApp
from pulse.tui.client import PulseClient
from pulse.tui.screens.dashboard import DashboardScreen
from pulse.tui.screens.journeys import FunnelScreen, PathsScreen, RetentionScreen
from pulse.tui.screens.projects import ProjectsScreen
from pulse.tui.screens.visitor import VisitorScreen
from pulse.tui.state import FilterMemory, FunnelQuery, PathsQuery, RetentionQuery
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
    await pilot.wait_for_scheduled_animations()
    # DataTable keeps rendered lines keyed without the width they were rendered at: one drawn before the
    # padding took its cell can stay, and the capture would differ by that cell from run to run
    for table in screen.query(DataTable):
        table._clear_caches()
        table.refresh()
    await pilot.pause(0.5)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_projects_screen(served, tmp_path, snap_compare, size):
    assert snap_compare(make_app(served, tmp_path), terminal_size=size, run_before=projects_loaded)


@pytest.mark.parametrize("size", [(80, 24), (200, 50)], ids=["80x24", "200x50"])
def test_dashboard(served, tmp_path, snap_compare, size):
    assert snap_compare(make_app(served, tmp_path), terminal_size=size, run_before=dashboard_loaded)


async def two_filters_loaded(pilot) -> None:
    await dashboard_loaded(pilot)
    await pilot.pause(0.3)


def test_dashboard_with_two_filters(served, tmp_path, snap_compare):
    """Both chips in sight at 80x24, the breakdown rows below the chart."""
    app = make_app(served, tmp_path)
    server, project_id = served
    app.memory.put(server.url, project_id, dataclasses.replace(POPULATION_QUERY, filters=(
        ("trait.gender", "Female"), ("browser", "Firefox"))))
    assert snap_compare(app, terminal_size=(80, 24), run_before=two_filters_loaded)


async def visitor_opened(pilot) -> None:
    await dashboard_loaded(pilot)
    screen = pilot.app.screen
    screen.query_one("#breakdowns").activate("users")
    await until(pilot, lambda: screen.query_one("#table-users").row_count > 0, "the visitors")
    screen.query_one("#table-users").focus()
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(pilot.app.screen, VisitorScreen)
                and pilot.app.screen.query_one("#visitor-events").row_count > 0, "the timeline")
    await pilot.pause(0.3)


def test_visitor_timeline(served, tmp_path, snap_compare):
    assert snap_compare(make_app(served, tmp_path), terminal_size=(80, 24), run_before=visitor_opened)


async def view_opened(pilot, key: str, screen_type) -> None:
    await dashboard_loaded(pilot)
    await pilot.press(key)
    await until(pilot, lambda: isinstance(pilot.app.screen, screen_type) and pilot.app.screen.loaded, "the view")
    await pilot.wait_for_scheduled_animations()
    for table in pilot.app.screen.query(DataTable):  # as on the dashboard: lines drawn at their final width
        table._clear_caches()
        table.refresh()
    await pilot.pause(0.5)


@pytest.mark.parametrize("key, screen_type", [("F", FunnelScreen), ("R", RetentionScreen), ("P", PathsScreen)],
                         ids=["funnel", "retention", "paths"])
def test_journeys(served, tmp_path, snap_compare, key, screen_type):
    """Each view at 80x24: a funnel of three steps by browser, daily retention, paths from the home page."""
    app = make_app(served, tmp_path)
    server, project_id = served
    for name, view in (("funnel", FunnelQuery(("page_view", "click", "purchase"), "1d", "browser")),
                       ("retention", RetentionQuery()), ("paths", PathsQuery("/", 2))):
        app.memory.put_view(server.url, project_id, name, view)

    async def run_before(pilot) -> None:
        await view_opened(pilot, key, screen_type)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
