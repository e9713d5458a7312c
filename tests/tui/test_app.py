"""The real app under Textual's pilot, against a real pulse server with the generated population."""

from __future__ import annotations

import time

import aiohttp

from pulse.server.app import create_app
from pulse.tui.app import PulseApp
from pulse.tui.client import PulseClient
from pulse.tui.screens.dashboard import DashboardScreen
from pulse.tui.screens.dialogs import FilterPickerScreen
from pulse.tui.screens.projects import ProjectsScreen
from pulse.tui.state import change, count, duration, percent
from pulse.tui.widgets.live_feed import LiveFeed
from pulse.tui.widgets.metric_card import MetricCard
from pulse.tui.widgets.top_events import TopEventsChart
from tests.tui.conftest import OPERATOR, POPULATION_QUERY


async def until(pilot, condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def api(server, endpoint: str, params: dict) -> dict:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {OPERATOR}"}) as session:
        async with session.get(f"{server.url}/api/v1/projects/{server.project.id}/{endpoint}", params=params) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def post(server, *events: dict, agent: str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0") -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/api/v1/events/ingest", json={"events": list(events)},
                                headers={"X-API-Key": server.project.ingest_key, "User-Agent": agent}) as r:
            assert r.status == 202, await r.text()


def cards(screen: DashboardScreen) -> dict[str, str]:
    return {card.id.removeprefix("card-"): card.value for card in screen.query(MetricCard).results(MetricCard)}


def expected_cards(overview: dict) -> dict[str, str]:
    return {"events": count(overview["events"]), "users": count(overview["unique_users"]),
            "sessions": count(overview["sessions"]), "bounce": percent(overview["bounce_rate"]),
            "duration": duration(overview["avg_session_seconds"]), "top": overview["top_event"]["event"],
            "daily": count(overview["daily_average"]), "live": count(overview["live_visitors"])}


async def open_dashboard(pilot, app) -> DashboardScreen:
    await until(pilot, lambda: isinstance(app.screen, ProjectsScreen) and app.screen.projects, "the projects")
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, DashboardScreen), "the dashboard")
    screen = app.screen
    await until(pilot, lambda: screen.overview and screen.query_one("#connection").has_class("-live"),
                "numbers and the live feed")
    return screen


async def settled(pilot, screen: DashboardScreen) -> None:
    await pilot.pause(0.05)
    await until(pilot, lambda: not screen.loading, "the numbers to load")


async def test_projects_screen_lists_what_the_api_lists(server, memory):
    app = PulseApp(PulseClient(server.url, OPERATOR), memory=memory)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ProjectsScreen) and app.screen.projects, "the projects")
        table = app.screen.query_one("#projects-table")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {OPERATOR}"}) as session:
            async with session.get(f"{server.url}/api/v1/projects") as response:
                listed = (await response.json())["projects"]
        assert table.row_count == len(listed) == 1
        row = table.get_row_at(0)
        assert str(row[0]) == "shop" and str(row[2]) == count(listed[0]["events_today"])


async def test_dashboard_numbers_ranges_bars_and_filters(server, memory):
    memory.put(server.url, server.project.id, POPULATION_QUERY)
    app = PulseApp(PulseClient(server.url, OPERATOR), memory=memory, refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = await open_dashboard(pilot, app)
        overview = await api(server, "overview", POPULATION_QUERY.params())
        assert overview["events"] > 0
        assert cards(screen) == expected_cards(overview)
        text, _ = change(overview["events"], overview["previous"]["events"], overview["previous"]["events"])
        assert str(screen.query_one("#card-events .card-change").content) == text

        # the top-events chart shows the API's rows; selecting a bar narrows the time chart, the chip clears it
        top = await api(server, "top-events", {**POPULATION_QUERY.params(), "limit": "10"})
        chart = screen.query_one(TopEventsChart)
        assert [o.id for o in chart.options] == [r["value"] for r in top["rows"]]
        chart.focus()
        while chart.highlighted != 1:
            await pilot.press("down")
        await pilot.press("enter")
        chosen = top["rows"][1]["value"]
        await until(pilot, lambda: screen.query_state.chart_event == chosen, "the bar selection")
        await settled(pilot, screen)
        chip = screen.query_one("#chart-chip")
        assert chip.display and str(screen.query_one("#chart-title").content).startswith(f"{chosen} per ")
        series = await api(server, "timeseries", screen.query_state.timeseries_params())
        assert screen.query_one("#chart").current == [b["events"] for b in series["buckets"]]
        assert sum(screen.query_one("#chart").current) == next(r["count"] for r in top["rows"] if r["value"] == chosen)
        await pilot.click("#chart-chip")
        await until(pilot, lambda: screen.query_state.chart_event is None, "the chip to clear the selection")
        assert not chip.display

        # a range preset, then back to the custom dates through the dialog
        await pilot.press("3")
        await until(pilot, lambda: screen.query_state.range == "30d", "the 30-day range")
        await settled(pilot, screen)
        assert screen.query_one("#range-30d").has_class("-active")
        await pilot.press("c")
        await pilot.pause()
        await pilot.press(*["backspace"] * 10, *"2026-03-01", "tab", *["backspace"] * 10, *"2026-03-05", "enter")
        await until(pilot, lambda: screen.query_state.range == "custom", "the custom range")
        await settled(pilot, screen)
        assert cards(screen) == expected_cards(overview)

        # a trait filter in a few keystrokes: f, pick trait.gender, enter, pick a value, enter
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, FilterPickerScreen), "the filter picker")
        picker = app.screen
        keys = picker.query_one("#picker-keys")
        await until(pilot, lambda: keys.option_count > 0, "the filter keys")
        await pilot.press("down")  # trait.age_group, trait.gender come first
        await until(pilot, lambda: picker.key == "trait.gender", "the gender key")
        values = picker.query_one("#picker-values")
        await until(pilot, lambda: values.option_count == 3, "the gender values")
        await pilot.press("enter")
        picked = values.get_option_at_index(0).id
        await pilot.press("enter")
        await until(pilot, lambda: screen.query_state.filters == (("trait.gender", picked),), "the trait filter")
        await settled(pilot, screen)
        filtered = await api(server, "overview", screen.query_state.params())
        assert filtered["events"] < overview["events"]
        assert cards(screen) == expected_cards(filtered)
        chips = [str(b.label) for b in screen.query("FilterBar .chip")]
        assert chips == [f"trait.gender={picked} ×"]

        # the filters are remembered for the next run
        assert memory.get(server.url, server.project.id).filters == (("trait.gender", picked),)
        await pilot.press("x")
        await until(pilot, lambda: not screen.query_state.filters, "the filter to go")
        await settled(pilot, screen)
        assert cards(screen) == expected_cards(overview)
        assert not list(screen.query("FilterBar .chip"))


async def test_live_feed_shows_new_events_pauses_and_opens_details(server, memory):
    app = PulseApp(PulseClient(server.url, OPERATOR), memory=memory, refresh_s=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_dashboard(pilot, app)
        feed = screen.query_one(LiveFeed)
        await post(server, {"event": "checkout", "distinct_id": "u-live", "page_url": "https://site.example/cart",
                            "properties": {"total": 42, "coupon": "SPRING"}})
        await until(pilot, lambda: [e.event for e in feed.events] == ["checkout"], "the new event in the feed")
        assert feed.events[0].path == "/cart" and feed.events[0].browser == "Firefox"

        await pilot.press("p")
        assert feed.paused and feed.has_class("-paused")
        await post(server, {"event": "while_paused", "distinct_id": "u-live"})
        await until(pilot, lambda: feed.pending_total == 1, "the event to be held back")
        await pilot.pause(0.3)
        assert [e.event for e in feed.events] == ["checkout"]
        assert "1 new" in str(feed.border_subtitle)
        await pilot.press("p")
        await until(pilot, lambda: [e.event for e in feed.events] == ["while_paused", "checkout"], "the resume")

        feed.focus()
        await pilot.press("down", "enter")
        await until(pilot, lambda: app.screen.__class__.__name__ == "EventDetailScreen", "the event details")
        body = str(app.screen.query_one("#detail-body").render())
        assert "checkout" in str(app.screen.query_one(".dialog-title").render())
        assert "prop.coupon  SPRING" in body and "prop.total  42" in body
        await pilot.press("escape")
        assert app.screen is screen


async def test_terminal_escapes_in_events_never_reach_the_screen(server, memory):
    app = PulseApp(PulseClient(server.url, OPERATOR), memory=memory, refresh_s=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_dashboard(pilot, app)
        feed = screen.query_one(LiveFeed)
        evil = "\x1b]0;owned\x07\x1b[2J\x1b[31mred"
        await post(server, {"event": evil, "distinct_id": "\x1b[1mbold", "page_url": "https://site.example/\x1b[5m",
                            "properties": {"k": "\x9b31m"}})
        await until(pilot, lambda: len(feed.events) == 1, "the hostile event")
        lines = "".join(segment.text for y in range(3) for segment in feed.render_line(y))
        assert "\x1b" not in lines and "\x07" not in lines
        assert "owned" in lines
        await pilot.press("r")
        await settled(pilot, screen)
        feed.focus()
        await pilot.press("enter")
        await pilot.pause()
        body = str(app.screen.query_one("#detail-body").render())
        assert not any(ch in body for ch in "\x1b\x07\x9b")


async def test_reconnects_after_a_server_restart(aiohttp_server, server, memory):
    app = PulseApp(PulseClient(server.url, OPERATOR), memory=memory, refresh_s=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_dashboard(pilot, app)
        connection = screen.query_one("#connection")
        await server.running.close()
        await until(pilot, lambda: connection.has_class("-retrying"), "the disconnected state")
        assert screen.has_class("-disconnected") and "reconnecting" in str(connection.content)
        await pilot.press("r")  # a refresh while the server is away is an error in the UI, not a crash
        await until(pilot, lambda: screen.query_one("#load-state").has_class("-error"), "the error state")
        await aiohttp_server(create_app(server.settings), port=server.port)
        await until(pilot, lambda: connection.has_class("-live"), "the reconnect", timeout=20)
        await settled(pilot, screen)
        assert not screen.query_one("#load-state").has_class("-error")
        await post(server, {"event": "after_restart", "distinct_id": "u-back"})
        feed = screen.query_one(LiveFeed)
        await until(pilot, lambda: any(e.event == "after_restart" for e in feed.events), "events after the restart")


async def test_help_mouse_and_self_tracking(server, memory, make_project):
    from pulse.tui.client import SelfTracker
    from pulse.tui.screens.help import HelpScreen

    ops = make_project("ops")
    tracker = SelfTracker(server.url, ops.ingest_key, "operator@host")
    app = PulseApp(PulseClient(server.url, OPERATOR), memory=memory, tracker=tracker, refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ProjectsScreen) and app.screen.projects, "the projects")
        for _ in range(100):  # the server sees the new project within its catalog poll; r reloads the list
            if app.screen.query_one("#projects-table").row_count == 2:
                break
            await pilot.press("r")
            await pilot.pause(0.1)
        assert app.screen.query_one("#projects-table").row_count == 2
        app.screen.query_one("#projects-table").move_cursor(row=0)
        screen = await open_dashboard(pilot, app)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        keys = [str(app.screen.query_one("#help-table").get_row_at(i)[1])
                for i in range(app.screen.query_one("#help-table").row_count)]
        assert {"Filter", "Pause", "Refresh", "Range: 24 hours, 7, 30, 90 days", "Dates"} <= set(keys)
        await pilot.press("escape")
        assert app.screen is screen

        await pilot.click("#range-24h")  # the mouse works on the filter bar
        await until(pilot, lambda: screen.query_state.range == "24h", "the clicked range")
        await app.flush_tracking()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ops.read_token}"}) as session:
        async with session.get(f"{server.url}/api/v1/projects/{ops.id}/events", params={"range": "24h"}) as response:
            tracked = [(r["event"], r["properties"], r["distinct_id"]) for r in (await response.json())["rows"]]
    assert ("range_changed", {"range": "24h"}, "operator@host") in tracked
    assert ("$screen", {"screen": "dashboard", "project": server.project.id}, "operator@host") in tracked
    assert ("$screen", {"screen": "projects"}, "operator@host") in tracked
