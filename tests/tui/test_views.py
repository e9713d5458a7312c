"""The dashboard at 80x24 and its views (UTM, properties, sessions, visitors), over a real server with known data."""

from __future__ import annotations

import inspect
from pathlib import Path

from textual.app import App
from textual.geometry import Region

from pulse.tui.app import PulseApp
from pulse.tui.client import PulseClient
from pulse.tui.state import DashboardQuery, change
from pulse.tui.widgets.filter_bar import FilterBar
from pulse.tui.widgets.live_feed import LiveFeed
from pulse.tui.widgets.top_events import TopEventsChart
from tests.tui.conftest import OPERATOR, POPULATION_QUERY
from tests.tui.test_app import api, open_dashboard, post, settled, until

SMALL = (80, 24)


def make_app(server, memory, query: DashboardQuery = POPULATION_QUERY) -> PulseApp:
    memory.put(server.url, server.project.id, query)
    return PulseApp(PulseClient(server.url, OPERATOR), memory=memory, refresh_s=3600)


def on_screen(widget, size=SMALL) -> bool:
    """Wholly inside the terminal, and what is drawn at its first and last cells (nothing covers or clips it)."""
    region = widget.region
    if not region or not Region(0, 0, *size).contains_region(region):
        return False
    corners = ((region.x, region.y), (region.right - 1, region.bottom - 1))
    return all(_within(widget.screen.get_widget_at(x, y)[0], widget) for x, y in corners)


def _within(found, widget) -> bool:
    return found is widget or widget in found.ancestors


async def open_tab(pilot, screen, tab: str):
    from pulse.tui.widgets.breakdown import BreakdownTabs
    tabs = screen.query_one(BreakdownTabs)
    tabs.activate(tab)
    pane = tabs.pane(tab)
    await until(pilot, lambda: pane.table.row_count > 0, f"the {tab} rows")
    pane.table.focus()
    await pilot.pause()
    return pane


async def test_every_filter_chip_is_shown_at_80x24(server, memory):
    filters = (("trait.gender", "Female"), ("trait.age_group", "18-40"), ("browser", "Firefox"))
    app = make_app(server, memory, DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05", filters=filters))
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        wanted = [f"{k}={v} ×" for k, v in filters]
        await until(pilot, lambda: [str(chip.label) for chip in screen.query("FilterBar .chip")] == wanted, "the chips")
        await pilot.pause(0.2)
        chips = list(screen.query("FilterBar .chip"))
        assert [str(chip.label) for chip in chips] == wanted
        assert all(on_screen(chip) for chip in chips)
        assert not any(a.region.overlaps(b.region) for i, a in enumerate(chips) for b in chips[i + 1:])


async def test_chips_are_laid_out_when_the_line_they_follow_is_placed_after_the_bar():
    """The bar can reach its size before the presets and range label are placed (they mount on their own):
    the chips come once the line is placed, though the bar does not resize again."""
    filters = (("trait.gender", "Female"), ("trait.age_group", "18-40"), ("browser", "Firefox"))

    class Host(App):
        CSS_PATH = Path(inspect.getfile(PulseApp)).with_name(PulseApp.CSS_PATH)  # pulse's own styles

        def compose(self):
            yield FilterBar()

    async with Host().run_test(size=SMALL) as pilot:
        bar = pilot.app.query_one(FilterBar)
        line = bar.query_one("#filter-line")
        for item in line.children:
            item.display = False  # not placed: out of the layout, as before they are mounted
        await pilot.pause(0.2)
        bar.show(DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05", filters=filters))
        await pilot.pause(0.2)
        for item in line.children:
            item.display = True
        wanted = [f"{k}={v} ×" for k, v in filters]
        await until(pilot, lambda: [str(chip.label) for chip in bar.query(".chip")] == wanted, "the chips")
        await pilot.pause(0.2)
        assert all(on_screen(chip) for chip in bar.query(".chip"))


async def test_breakdown_rows_and_the_feed_show_at_80x24_without_scrolling(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        table = screen.query_one("#table-pages")
        await until(pilot, lambda: table.row_count > 0, "the pages")
        await pilot.pause(0.2)
        assert screen.query_one("#body").scroll_y == 0
        assert on_screen(table) and table.region.height >= 5  # the header and at least four rows
        assert on_screen(screen.query_one(LiveFeed))


async def test_help_lists_each_key_once_and_scrolls_at_80x24(server, memory):
    from pulse.tui.screens.help import HelpScreen

    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        await open_dashboard(pilot, app)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help")
        await pilot.pause(0.2)
        table = app.screen.query_one("#help-table")
        keys = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert len(keys) == len(set(keys))
        assert {"1-4", "r", "]", "[", "q", "p"} <= set(keys) and not {"2", "3", "4"} & set(keys)
        scroll = app.screen.query_one("#help-scroll")
        assert scroll.max_scroll_y > 0  # 24 lines do not hold it all: it scrolls
        await pilot.press("end")
        await until(pilot, lambda: scroll.scroll_y == scroll.max_scroll_y, "the end of the help")
        last = table.virtual_region.y + table.row_count - 1  # the last key's line, in the scroll's own lines
        assert scroll.scroll_y <= last < scroll.scroll_y + scroll.scrollable_content_region.height


async def test_footer_keys_fit_80_columns_and_all_show_when_wide(server, memory):
    from textual.widgets._footer import FooterKey

    for size, hidden in ((SMALL, True), ((200, 50), False)):
        app = make_app(server, memory)
        async with app.run_test(size=size) as pilot:
            screen = await open_dashboard(pilot, app)
            await pilot.pause(0.2)
            shown = [key for key in screen.query(FooterKey) if key.display]
            assert sum(key.outer_size.width for key in shown) <= size[0]
            assert all(on_screen(key, size) for key in shown)
            assert ("reload" not in {key.action for key in shown}) == hidden


async def test_top_event_names_are_cut_with_an_ellipsis_and_stay_apart(server, memory):
    names = ["newcomer_test_signup_started", "newcomer_test_signup_finished", "newcomer_test_search"]
    await post(server, *({"event": name, "distinct_id": f"u-{i}"} for i, name in enumerate(names)))
    app = make_app(server, memory, DashboardQuery(range="24h"))
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        chart = screen.query_one(TopEventsChart)
        await until(pilot, lambda: chart.option_count == 3, "the new events")
        shown = [str(chart.get_option_at_index(i).prompt).split(" ")[0] for i in range(3)]
        assert all("…" in name for name in shown)
        assert len(set(shown)) == 3


async def test_chart_title_names_the_selected_event_and_hourly_axes_have_dates(server, memory):
    app = make_app(server, memory, DashboardQuery(range="custom", start="2026-03-01", end="2026-03-03"))
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        await pilot.press("e", "down", "enter")
        await until(pilot, lambda: screen.query_state.chart_event is not None, "the bar selection")
        await settled(pilot, screen)
        event = screen.query_state.chart_event
        title, chip = screen.query_one("#chart-title"), screen.query_one("#chart-chip")
        assert str(title.content) == f"{event} per day · dots: previous period"
        assert str(chip.label) == "all events ×" and not title.region.overlaps(chip.region)

        await pilot.press("i")
        await until(pilot, lambda: screen.query_state.effective_interval == "hour", "hourly buckets")
        await settled(pilot, screen)
        chart = screen.query_one("#chart")
        await until(pilot, lambda: len(chart.labels) == 72, "three days of hours")
        assert chart.labels[0] == "Mar 01 00:00" and chart.labels[24] == "Mar 02 00:00"
        assert len(set(chart.labels)) == 72


async def test_keys_jump_to_the_panes_and_the_focused_one_stands_out(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        feed = screen.query_one(LiveFeed)
        tabs = screen.query_one("#breakdowns")
        top = screen.query_one(TopEventsChart)
        await pilot.press("l")
        assert app.focused is feed
        await pilot.pause()
        assert feed.styles.border_top[0] == "heavy" and tabs.styles.border_top[0] == "round"
        await pilot.press("t")
        assert app.focused is screen.query_one("#table-pages")
        await pilot.pause()
        assert tabs.styles.border_top[0] == "heavy" and feed.styles.border_top[0] == "round"
        await pilot.press("right_square_bracket")  # the next tab's table keeps the focus in the breakdowns
        assert app.focused is screen.query_one("#table-entry-pages")
        await pilot.press("e")
        assert app.focused is top


async def test_live_feed_opens_with_the_last_events(server, memory):
    await post(server, *({"event": f"before_{i}", "distinct_id": "u-early", "page_url": f"https://site.example/{i}"}
                         for i in range(3)))
    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        feed = screen.query_one(LiveFeed)
        await until(pilot, lambda: len(feed.events) >= 3, "the last events in the feed")
        listed = await api(server, "events", {"range": "7d", "limit": "100"})
        assert [(e.event, e.ts) for e in feed.events] == [(r["event"], r["ts"]) for r in listed["rows"]]
        lines = "".join(segment.text for y in range(3) for segment in feed.render_line(y))
        assert "before_2" in lines
        await post(server, {"event": "after_open", "distinct_id": "u-late"})
        await until(pilot, lambda: feed.events[0].event == "after_open", "a new event on top")
        assert len(feed.events) == len(listed["rows"]) + 1  # none shown twice


async def test_count_columns_say_what_they_count(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=(200, 50)) as pilot:
        screen = await open_dashboard(pilot, app)
        counted = {tab: str(screen.query_one(f"#table-{tab}").columns["count"].label)
                   for tab in ("pages", "entry-pages", "exit-pages", "referrers", "utm", "browsers", "os", "devices",
                               "properties")}
        assert counted == {"pages": "Events", "entry-pages": "Sessions", "exit-pages": "Sessions",
                           "referrers": "Sessions", "utm": "Sessions", "browsers": "Events", "os": "Events",
                           "devices": "Events", "properties": "Events"}


async def test_utm_tab_switches_between_source_medium_and_campaign(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        pane = await open_tab(pilot, screen, "utm")
        rows = await api(server, "utm", {**POPULATION_QUERY.params(), "limit": "20", "dimension": "source"})
        assert [str(r.key.value) for r in pane.table.ordered_rows] == [str(r["value"]) for r in rows["rows"]]
        await pilot.press("u")
        assert pane.dimension == "medium" and str(pane.table.columns["value"].label) == "UTM medium"
        medium = await api(server, "utm", {**POPULATION_QUERY.params(), "limit": "20", "dimension": "medium"})
        await until(pilot, lambda: [str(r.key.value) for r in pane.table.ordered_rows]
                    == [str(r["value"]) for r in medium["rows"]], "the media")
        await pilot.click("#utm-campaign")
        assert pane.dimension == "campaign"


async def test_properties_tab_picks_a_key_then_a_value_as_a_filter(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        pane = await open_tab(pilot, screen, "properties")
        keys = await api(server, "properties", {**POPULATION_QUERY.params(), "limit": "20"})
        assert [r.key.value for r in pane.table.ordered_rows] == [r["value"] for r in keys["rows"]] == ["plan"]
        await pilot.press("enter")
        values = await api(server, "properties/plan", {**POPULATION_QUERY.params(), "limit": "20"})
        await until(pilot, lambda: [r.key.value for r in pane.table.ordered_rows][1:]
                    == [r["value"] for r in values["rows"]], "the values of plan")
        await pilot.press("down", "enter")
        chosen = values["rows"][0]["value"]
        await until(pilot, lambda: ("prop.plan", chosen) in screen.query_state.filters, "the property filter")


async def test_sessions_list_pages_by_its_cursor(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        pane = await open_tab(pilot, screen, "sessions")
        first = await api(server, "sessions", {**POPULATION_QUERY.params(), "limit": "20"})
        assert [r.key.value for r in pane.table.ordered_rows] == [r["session_id"] for r in first["rows"]]
        assert first["next_cursor"]
        second = await api(server, "sessions", {**POPULATION_QUERY.params(), "limit": "20",
                                                "cursor": first["next_cursor"]})
        await pilot.press(*["down"] * 19)  # to the last row
        await until(pilot, lambda: pane.table.row_count == 40, "the next page")
        assert [r.key.value for r in pane.table.ordered_rows] == [r["session_id"] for r in first["rows"] + second["rows"]]


async def test_enter_on_a_visitor_opens_their_timeline(server, memory):
    from pulse.tui.screens.visitor import VisitorScreen

    app = make_app(server, memory)
    async with app.run_test(size=SMALL) as pilot:
        screen = await open_dashboard(pilot, app)
        pane = await open_tab(pilot, screen, "users")
        listed = await api(server, "users", {**POPULATION_QUERY.params(), "limit": "50"})
        assert [r.key.value for r in pane.table.ordered_rows] == [r["distinct_id"] for r in listed["rows"]]
        await pilot.press("down", "enter")
        who = listed["rows"][1]["distinct_id"]
        await until(pilot, lambda: isinstance(app.screen, VisitorScreen), "the timeline")
        timeline = app.screen
        events = timeline.query_one("#visitor-events")
        found = await api(server, f"users/{who}", {**POPULATION_QUERY.window_params(), "limit": "100"})
        assert found["rows"]
        await until(pilot, lambda: events.row_count == len(found["rows"]), "the visitor's events")
        assert [r.key.value for r in events.ordered_rows] == [r["uuid"] for r in found["rows"]]
        assert who in str(timeline.query_one("#project-name").content)
        assert on_screen(events)
        await pilot.press("escape")
        assert app.screen is screen


def test_changes_need_a_previous_period_worth_comparing():
    from pulse.tui.state import MIN_COMPARABLE_EVENTS

    assert change(50, 0, 0) == ("new", 0)
    assert change(0, 0, 0)[0] == ""
    assert change(50, 10, MIN_COMPARABLE_EVENTS - 1) == ("", 0)  # too few events before for a percentage
    assert change(50, 25, MIN_COMPARABLE_EVENTS) == ("▲100%", 1)
