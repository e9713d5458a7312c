"""Countries, languages, screens, goals and bots in the dashboard, and country, language and screen in the filter
picker, against a real server: the generated population plus visitors whose backend forwards their IP address,
language and screen width, purchases with revenue, a declared page goal and a crawler."""

from __future__ import annotations

import aiohttp
import pytest

from pulse.server.app import create_app
from pulse.storage.sqlite.goals import add_goal
from pulse.storage.sqlite.projects import get_project
from pulse.tui.screens.dialogs import FilterPickerScreen
from pulse.tui.state import DashboardQuery
from pulse.tui.widgets.breakdown import BREAKDOWNS, BreakdownTabs
from tests.server.test_analytics import TZ, generate
from tests.tui.conftest import POPULATION_QUERY, LiveServer
from tests.tui.test_app import api, cards, expected_cards, open_dashboard, settled, until
from tests.tui.test_views import SMALL, make_app, on_screen, open_tab

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
          " Safari/537.36")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BACKEND = "Python/3.11 aiohttp/3.10"  # a backend's own agent: the events' forwarded ones count
# ip -> country in the bundled data, language, screen width
VISITORS = [("8.8.8.8", "en-US", 390), ("8.8.8.8", "en", 1920), ("8.8.8.8", "es", 800),
            ("81.2.69.160", "en-GB", 1280), ("81.2.69.160", "en", 390), ("5.6.7.8", "de-DE", 1600)]
PURCHASES = [{"revenue": 19.99, "currency": "eur"}, {"revenue": 5, "currency": "EUR"}, {"amount": 40.65, "currency": "usd"}]


LONG_PATH = "/docs/guides/installing-pulse-behind-a-reverse-proxy-with-tls"


def visits() -> list[dict]:
    events = []
    for i, (ip, language, width) in enumerate(VISITORS):
        common = {"distinct_id": f"v-{i}", "ip": ip, "language": language, "screen_width": width,
                  "user_agent": CHROME}
        events.append({**common, "event": "page_view", "page_url": "https://site.example/pricing",
                       "timestamp": f"2026-03-03T0{i}:00:00Z"})
        if i < len(PURCHASES):
            events.append({**common, "event": "purchase", "properties": PURCHASES[i],
                           "timestamp": f"2026-03-03T0{i}:05:00Z"})
            events.append({**common, "event": "page_view", "page_url": "https://site.example/thank-you",
                           "timestamp": f"2026-03-03T0{i}:06:00Z"})
    events.append({"event": "page_view", "distinct_id": "v-0", "ip": VISITORS[0][0], "user_agent": CHROME,
                   "page_url": f"https://site.example{LONG_PATH}", "timestamp": "2026-03-03T08:00:00Z"})
    events.append({"event": "page_view", "distinct_id": "crawler", "user_agent": GOOGLEBOT, "ip": "8.8.8.8",
                   "page_url": "https://site.example/", "timestamp": "2026-03-03T09:00:00Z"})
    return events


@pytest.fixture
async def server(aiohttp_server, tui_settings, make_project, db):
    project = make_project("shop", domain="site.example", timezone=TZ)
    add_goal(db, get_project(db, project.id), "/thank-you")  # as `pulse goals add shop /thank-you` declares it
    running = await aiohttp_server(create_app(tui_settings))
    url = str(running.make_url("")).rstrip("/")
    requests, _, _ = generate()
    batches = [(request["agent"], request["events"]) for request in requests] + [(BACKEND, visits())]
    async with aiohttp.ClientSession() as session:
        for agent, events in batches:
            async with session.post(f"{url}/api/v1/events/ingest", json={"events": events},
                                    headers={"X-API-Key": project.ingest_key, "User-Agent": agent}) as response:
                assert response.status == 202, await response.text()
    return LiveServer(url, project, tui_settings, running.port, running)


def shown(pane) -> list[list[str]]:
    return [[str(cell) for cell in pane.table.get_row(row.key)] for row in pane.table.ordered_rows]


async def test_country_language_and_screen_tabs_show_the_apis_rows_and_enter_filters(server, memory):
    query = DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05", filters=(("event", "page_view"),))
    app = make_app(server, memory, query)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        for tab, endpoint in (("countries", "countries"), ("languages", "languages"), ("screens", "screens")):
            pane = await open_tab(pilot, screen, tab)
            found = (await api(server, endpoint, {**query.params(), "limit": "20"}))["rows"]
            assert found
            names = {"countries": lambda r: f"{r['value']} {r['label']}", "languages": lambda r: r["label"],
                     "screens": lambda r: r["value"]}[tab]
            await until(pilot, lambda: shown(pane) == [[names(r), f"{r['count']:,}", f"{r['unique_users']:,}"]
                                                       for r in found], f"the {tab} rows")

        pane = await open_tab(pilot, screen, "countries")
        countries = (await api(server, "countries", {**query.params(), "limit": "20"}))["rows"]
        gb = next(i for i, r in enumerate(countries) if r["value"] == "GB")
        pane.table.move_cursor(row=gb, animate=False)
        await pilot.press("enter")
        await until(pilot, lambda: ("country", "GB") in screen.query_state.filters, "the country filter")
        await settled(pilot, screen)
        assert [str(chip.label) for chip in screen.query("FilterBar .chip")] == [
            "event=page_view ×", "country=GB United Kingdom ×"]
        assert cards(screen) == expected_cards(await api(server, "overview", screen.query_state.params()))


async def test_goals_tab_shows_conversions_and_revenue_and_enter_filters_on_the_goal(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=(200, 50)) as pilot:
        screen = await open_dashboard(pilot, app)
        pane = await open_tab(pilot, screen, "goals")
        goals = await api(server, "goals", {**POPULATION_QUERY.params(), "limit": "100"})
        money = {r["goal"]: ", ".join(f"{m['currency']} {m['amount']:,.2f}" if m["currency"] else f"{m['amount']:,.2f}"
                                      for m in r["revenue"]) for r in goals["rows"]}
        await until(pilot, lambda: shown(pane) == [
            [r["goal"], f"{r['visitors']:,}", f"{r['events']:,}", f"{r['conversion_rate'] * 100:.1f}%", money[r["goal"]]]
            for r in goals["rows"]], "the goals")
        assert money["purchase"] == "EUR 24.99, USD 40.65"
        assert [str(c.label) for c in pane.table.ordered_columns] == ["Goal", "Visitors", "Events", "Conv. %", "Revenue"]

        keys = [row.key.value for row in pane.table.ordered_rows]
        pane.table.move_cursor(row=keys.index("event:purchase"), animate=False)
        await pilot.press("enter")
        await until(pilot, lambda: screen.query_state.filters == (("event", "purchase"),), "the event goal's filter")
        await settled(pilot, screen)
        assert cards(screen) == expected_cards(await api(server, "overview", screen.query_state.params()))

        await pilot.press("x")
        await until(pilot, lambda: not screen.query_state.filters, "no filter")
        await until(pilot, lambda: "page:/thank-you" in [row.key.value for row in pane.table.ordered_rows], "the page goal")
        keys = [row.key.value for row in pane.table.ordered_rows]
        pane.table.move_cursor(row=keys.index("page:/thank-you"), animate=False)
        pane.table.focus()
        await pilot.press("enter")
        await until(pilot, lambda: screen.query_state.filters == (("path", "/thank-you"),), "the page goal's filter")


async def test_bots_tab_shows_the_crawlers_without_the_dashboards_filters(server, memory):
    query = DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05", filters=(("browser", "Chrome"),))
    app = make_app(server, memory, query)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        pane = await open_tab(pilot, screen, "bots")
        bots = (await api(server, "bots", {**query.window_params(), "limit": "20"}))["rows"]
        assert [r["value"] for r in bots] == ["Googlebot"]
        await until(pilot, lambda: shown(pane) == [[r["value"], f"{r['count']:,}"] for r in bots], "the bots")
        assert "excluded" in str(screen.query_one("#breakdown-tabs").get_tab("tab-bots").label).lower()
        note = pane.query_one(".pane-note")
        assert "left out of every other number" in str(note.content).lower() and on_screen(note)
        assert not screen.query_one("#load-state").has_class("-error")  # no filter was sent: no 400


async def test_tab_strip_keeps_the_active_tab_in_sight_at_80x24(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        tabs = screen.query_one("#breakdown-tabs")
        strip = tabs.query_one("#tabs-scroll")
        await pilot.press("t")
        visited = []
        for key in ["right_square_bracket"] * len(BREAKDOWNS) + ["left_square_bracket"] * 3:
            await pilot.press(key)
            active = tabs.get_tab(tabs.active)
            await until(pilot, lambda: strip.region.contains_region(active.region), f"{tabs.active} in sight")
            visited.append(tabs.active.removeprefix("tab-"))
        assert {"countries", "languages", "screens", "goals", "bots"} <= set(visited)
        assert all(len(b.title) <= 15 for b in BREAKDOWNS)


async def test_picker_offers_countries_with_names_counted_under_the_filters(server, memory):
    query = DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05", filters=(("language", "en"),))
    app = make_app(server, memory, query)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, FilterPickerScreen), "the filter picker")
        picker = app.screen
        keys = picker.query_one("#picker-keys")
        await until(pilot, lambda: keys.option_count > 0, "the filter keys")
        ids = [keys.get_option_at_index(i).id for i in range(keys.option_count)]
        assert {"country", "language", "screen"} <= set(ids)
        keys.highlighted = ids.index("country")
        await until(pilot, lambda: picker.key == "country", "the country key")
        values = picker.query_one("#picker-values")
        countries = (await api(server, "countries", {**query.params(), "limit": "50"}))["rows"]
        everywhere = (await api(server, "countries", {**query.window_params(), "limit": "50"}))["rows"]
        assert countries != everywhere  # the language filter counts
        await until(pilot, lambda: values.option_count == len(countries), "the countries")
        prompts = [str(values.get_option_at_index(i).prompt) for i in range(values.option_count)]
        assert [p.split()[0] for p in prompts] == [r["value"] for r in countries]
        assert all(f"{r['value']} {r['label']}" in p and p.split()[-1] == f"{r['count']:,}"
                   for p, r in zip(prompts, countries))
        await pilot.press("enter")
        values.highlighted = [r["value"] for r in countries].index("GB")
        await pilot.press("enter")
        await until(pilot, lambda: ("country", "GB") in screen.query_state.filters, "the country filter")
        await settled(pilot, screen)
        assert [str(chip.label) for chip in screen.query("FilterBar .chip")] == [
            "language=en ×", "country=GB United Kingdom ×"]
        assert cards(screen) == expected_cards(await api(server, "overview", screen.query_state.params()))


async def test_chips_name_countries_and_are_cut_to_80_columns(server, memory):
    long_value = "a-very-long-campaign-value-" * 4
    query = (DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05")
             .with_filter("country", "GB", "United Kingdom").with_filter("prop.campaign", long_value))
    app = make_app(server, memory, query)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        await pilot.pause(0.2)
        chips = list(screen.query("FilterBar .chip"))
        labels = [str(chip.label) for chip in chips]
        assert labels[0] == "country=GB United Kingdom ×"
        assert labels[1].startswith("prop.campaign=a-very") and labels[1].endswith("… ×")
        assert all(on_screen(chip) for chip in chips)


async def test_a_long_value_is_cut_so_the_counts_stay_in_sight_at_80x24(server, memory):
    query = DashboardQuery(range="custom", start="2026-03-03", end="2026-03-03")
    app = make_app(server, memory, query)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        pane = await open_tab(pilot, screen, "pages")
        found = (await api(server, "pages", {**query.params(), "limit": "20"}))["rows"]
        assert LONG_PATH in [r["value"] for r in found]
        await until(pilot, lambda: [row[1:] for row in shown(pane)]
                    == [[f"{r['count']:,}", f"{r['unique_users']:,}"] for r in found], "the pages rows")
        long = shown(pane)[[r["value"] for r in found].index(LONG_PATH)][0]
        assert long.endswith("…") and LONG_PATH.startswith(long[:-1])
        await pilot.pause()
        table = pane.table
        assert table.virtual_size.width <= table.scrollable_content_region.width  # the Users column in sight
