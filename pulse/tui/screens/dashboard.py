"""One project's dashboard: metric cards, events over time, top events, breakdowns and the live feed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import date, timedelta

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Button, Label, TabbedContent

from pulse.protocol import LiveEvent, Overview, ProjectRow, Ranked
from pulse.tui.client import EVENTS_PAGE, OVERVIEW, RANKED_ROWS, TIMESERIES, ApiFailure, LiveState, PulseClient
from pulse.tui.messages import (BreakdownLoaded, ConnectionChanged, FilterRemoved, LoadFailed, RangeChosen,
                                StatsLoaded, TopEventSelected)
from pulse.tui.screens.dialogs import DateRangeScreen, EventDetailScreen, FilterPickerScreen
from pulse.tui.screens.journeys import FunnelScreen, PathsScreen, RetentionScreen
from pulse.tui.state import DashboardQuery, FilterMemory, change, clean, count, duration, percent, plain
from pulse.tui.screens.visitor import VisitorScreen
from pulse.tui.widgets.breakdown import BREAKDOWNS, BreakdownPane, BreakdownTabs, PagedPane, UtmPane
from pulse.tui.widgets.footer import DashboardFooter
from pulse.tui.widgets.filter_bar import FilterBar
from pulse.tui.widgets.live_feed import LiveFeed
from pulse.tui.widgets.metric_card import MetricCard
from pulse.tui.widgets.timeseries import TimeseriesChart
from pulse.tui.widgets.top_events import TopEventsChart

REFRESH_S = 10.0
FEED_BACKLOG = 100  # the last events the live feed opens with
CARDS = [  # id, label, lower is better
    ("events", "Events", False), ("users", "Unique users", False), ("sessions", "Sessions", False),
    ("bounce", "Bounce rate", True), ("duration", "Avg. duration", False), ("top", "Top event", False),
    ("daily", "Daily average", False), ("live", "Live visitors", False),
]


class DashboardScreen(Screen):
    BINDINGS = [
        Binding("question_mark", "app.help", "Help"),
        Binding("escape", "back", "Back"),
        Binding("1", "range('24h')", "Range", key_display="1-4", tooltip="Range: 24 hours, 7, 30, 90 days"),
        Binding("2", "range('7d')", "", show=False),  # no description: help lists 1-4 once
        Binding("3", "range('30d')", "", show=False),
        Binding("4", "range('90d')", "", show=False),
        Binding("c", "custom_dates", "Dates"),
        Binding("f", "add_filter", "Filter"),
        Binding("x", "remove_filter", "Unfilter"),
        Binding("X", "clear_filters", "Clear filters", show=False),
        Binding("b", "clear_bar", "All events"),
        Binding("i", "toggle_interval", "Interval"),
        Binding("p", "pause", "Pause"),
        Binding("r", "reload", "Refresh"),
        Binding("e", "jump('top-events')", "Top events", show=False, tooltip="Go to the top events"),
        Binding("t", "jump('breakdowns')", "Tables", show=False, tooltip="Go to the breakdown tables"),
        Binding("l", "jump('feed')", "Live feed", show=False, tooltip="Go to the live feed"),
        Binding("right_square_bracket", "tab(1)", "Next tab", show=False),
        Binding("left_square_bracket", "tab(-1)", "Previous tab", show=False),
        Binding("u", "utm", "UTM", show=False, tooltip="UTM tab: source, medium, campaign"),
        Binding("F", "journey('funnel')", "Funnel", tooltip="Funnel: persons through steps, under this range and filters"),
        Binding("R", "journey('retention')", "Retention", tooltip="Retention: cohorts and who came back"),
        Binding("P", "journey('paths')", "Paths", tooltip="Paths: where sessions went from a step"),
        Binding("q", "app.quit", "Quit", show=False),
    ]
    # in help, and in the footer when wide
    WIDE_ONLY = frozenset({"custom_dates", "toggle_interval", "reload",
                           "journey('funnel')", "journey('retention')", "journey('paths')"})

    query_state: reactive[DashboardQuery] = reactive(DashboardQuery, init=False)

    def __init__(self, client: PulseClient, project: ProjectRow, memory: FilterMemory, *,
                 refresh_s: float = REFRESH_S) -> None:
        super().__init__(id="dashboard")
        self.client = client
        self.project = project
        self.memory = memory
        self.refresh_s = refresh_s
        self.loading = False
        self.overview: Overview | None = None
        self.top_rows: list[Ranked] = []
        self.connection = LiveState("connecting")
        self.connection_was_lost = False  # reload the numbers when the feed comes back
        self.backlog_read = False  # the feed's first connection reads the last events once
        self.set_reactive(DashboardScreen.query_state, memory.get(client.url, project.id))

    @property
    def project_id(self) -> int:
        return self.project.id

    def compose(self) -> ComposeResult:
        with Horizontal(id="title-bar"):
            yield Label(plain(f"pulse › {self.project.name}"), id="project-name")
            yield Label("", id="range-text")
            yield Label("", id="load-state")
            yield Label("○ connecting", id="connection")
        yield FilterBar(id="filter-bar")
        with Grid(id="cards"):
            for card_id, label, inverse in CARDS:
                yield MetricCard(label, inverse=inverse, id=f"card-{card_id}")
        with VerticalScroll(id="body"):
            with Horizontal(id="row-charts"):
                with Vertical(id="chart-box"):
                    with Horizontal(id="chart-head"):
                        yield Label("Events over time", id="chart-title")
                        yield Button("", id="chart-chip", classes="chip", compact=True,
                                     tooltip="Show all events again (b)")
                    yield TimeseriesChart(id="chart")
                yield TopEventsChart(id="top-events")
            with Horizontal(id="row-tables"):
                yield BreakdownTabs(id="breakdowns")
                yield LiveFeed(id="feed")
        yield DashboardFooter(self.WIDE_ONLY)

    def on_mount(self) -> None:
        self.query_one("#top-events").border_title = "Top events"
        feed = self.query_one(LiveFeed)
        feed.border_title = "Live"
        for button in self.query(Button).results(Button):
            button.can_focus = False
        self.show_query()
        self.app.track("$screen", screen="dashboard", project=self.project_id)
        self.follow_live()
        self.reload()
        self.set_interval(self.refresh_s, self.tick)
        self.query_one(TopEventsChart).focus()

    # -- loading ------------------------------------------------------------------------------------

    def tick(self) -> None:
        if not self.loading:  # a slow answer is not interrupted by the next tick
            self.reload(tick=True)

    def reload(self, *, tick: bool = False) -> None:
        self.loading = True
        self.query_one("#load-state", Label).update("updating…")
        self.load_stats(self.query_state)
        pane = self.query_one(BreakdownTabs).pane()
        if not (tick and isinstance(pane, PagedPane) and pane.asked):  # keep the pages read further down
            self.load_breakdown(self.query_state, pane)

    @work(exclusive=True, group="stats")
    async def load_stats(self, query: DashboardQuery) -> None:
        try:
            overview, series, top = await asyncio.gather(
                self.client.project_get(self.project_id, "overview", query.params(), OVERVIEW),
                self.client.project_get(self.project_id, "timeseries", query.timeseries_params(), TIMESERIES),
                self.client.project_get(self.project_id, "top-events", {**query.params(), "limit": "10"}, RANKED_ROWS),
            )
        except ApiFailure as exc:
            self.post_message(LoadFailed("numbers", exc.status, exc.message))
            return
        self.post_message(StatsLoaded(query, overview, series, top))

    @work(exclusive=True, group="breakdown")
    async def load_breakdown(self, query: DashboardQuery, pane: BreakdownPane, cursor: str | None = None) -> None:
        tab = pane.breakdown.id
        endpoint, params, decoder = pane.request(query, cursor)
        try:
            found = await self.client.project_get(self.project_id, endpoint, params, decoder)
        except ApiFailure as exc:
            self.post_message(LoadFailed(pane.breakdown.title, exc.status, exc.message))
            return
        self.post_message(BreakdownLoaded(query, tab, found, more=cursor is not None))

    @work(exclusive=True, group="backlog")
    async def load_backlog(self) -> None:
        """The feed's last events, read after it connected: what came before it opened."""
        try:
            page = await self.client.project_get(self.project_id, "events", {"range": "7d", "limit": str(FEED_BACKLOG)},
                                                 EVENTS_PAGE)
        except ApiFailure as exc:
            self.post_message(LoadFailed("last events", exc.status, exc.message))
            return
        for feed in self.query(LiveFeed).results(LiveFeed):  # none once the dashboard has closed
            feed.preload([LiveEvent(event=r.event, ts=r.ts, distinct_id=r.distinct_id, path=r.path,
                                    properties=r.properties, browser=r.browser, os=r.os, device=r.device)
                          for r in page.rows])

    @work(exclusive=True, group="live")
    async def follow_live(self) -> None:
        feed = self.query_one(LiveFeed)
        await self.client.live(self.project_id, feed.push, lambda state: self.post_message(ConnectionChanged(state)),
                               on_dropped=feed.skip)

    def on_stats_loaded(self, message: StatsLoaded) -> None:
        self.loading = False
        if message.query != self.query_state:
            return  # an answer to a question no longer asked
        self.query_one("#load-state", Label).update(f"updated {time.strftime('%H:%M:%S', time.localtime(self.app.clock()))}")
        self.query_one("#load-state", Label).remove_class("-error")
        self.overview = message.overview
        self.show_cards(message.overview)
        self.query_one(TimeseriesChart).show(message.series)
        self.top_rows = message.top.rows
        self.query_one(TopEventsChart).show(self.top_rows, self.query_state.chart_event)

    def on_breakdown_loaded(self, message: BreakdownLoaded) -> None:
        if message.query == self.query_state:
            self.query_one(BreakdownTabs).pane(message.tab).show(message.found, more=message.more)

    def on_load_failed(self, message: LoadFailed) -> None:
        self.loading = False
        state = self.query_one("#load-state", Label)
        state.update(plain(f"{message.what}: {message.message}"))
        state.add_class("-error")
        if message.status:  # the server answered: say so once; unreachable shows in the connection state
            self.notify(message.message, title=f"could not load {message.what}", severity="error")

    def on_connection_changed(self, message: ConnectionChanged) -> None:
        self.connection = state = message.state
        label = self.query_one("#connection", Label)
        text = {"connecting": "○ connecting", "live": "● live", "failed": "✕ feed stopped"}.get(state.status, "")
        if state.status == "retrying":
            text = f"○ reconnecting in {state.retry_in:.0f}s"
        label.update(text)
        label.tooltip = state.detail or None
        for status in ("connecting", "live", "retrying", "failed"):
            label.set_class(state.status == status, f"-{status}")
        self.set_class(state.status != "live", "-disconnected")
        if state.status == "live":
            if not self.backlog_read:
                self.backlog_read = True
                self.load_backlog()
            if self.connection_was_lost:
                self.reload()  # numbers missed while away
            self.connection_was_lost = False
        elif state.status in ("retrying", "failed"):
            self.connection_was_lost = True
        if state.status == "failed":
            self.notify(state.detail, title="live feed stopped", severity="error", timeout=30)

    # -- showing ------------------------------------------------------------------------------------

    def show_cards(self, found: Overview) -> None:
        before = found.previous

        def card(card_id: str) -> MetricCard:
            return self.query_one(f"#card-{card_id}", MetricCard)

        def against(now: float, then: float) -> tuple[str, int]:
            return change(now, then, before.events)

        for card_id, now, then in (("events", found.events, before.events),
                                   ("users", found.unique_users, before.unique_users),
                                   ("sessions", found.sessions, before.sessions),
                                   ("daily", found.daily_average, before.daily_average)):
            card(card_id).show(count(now), *against(now, then))
        card("bounce").show(percent(found.bounce_rate), *against(found.bounce_rate, before.bounce_rate))
        card("duration").show(duration(found.avg_session_seconds),
                              *against(found.avg_session_seconds, before.avg_session_seconds))
        top, top_before = found.top_event, before.top_event
        if top is None:
            card("top").show("–")
        elif top_before is not None and top_before.event == top.event:
            card("top").show(plain(top.event), *against(top.count, top_before.count))
        else:
            card("top").show(plain(top.event), count(top.count))
        card("live").show(count(found.live_visitors), "last 5 min")

    def show_query(self) -> None:
        query = self.query_state
        self.query_one(FilterBar).show(query)
        self.query_one("#range-text", Label).update(f"{query.label} · {_per(query.effective_interval)}")
        chip = self.query_one("#chart-chip", Button)
        chip.label = "all events ×"
        chip.display = query.chart_event is not None
        subject = "Events" if query.chart_event is None else clean(query.chart_event)
        self.query_one("#chart-title", Label).update(plain(f"{subject} {_per(query.effective_interval)} · dots: previous period"))

    def watch_query_state(self, query: DashboardQuery) -> None:
        self.memory.put(self.client.url, self.project_id, query)
        for pane in self.query(BreakdownPane).results(BreakdownPane):
            pane.reset()
        self.show_query()
        self.loading = False
        self.reload()
        self.refresh_bindings()

    # -- actions ------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        query = self.query_state
        if action == "clear_bar":
            return query.chart_event is not None
        if action in ("remove_filter", "clear_filters"):
            return bool(query.filters)
        if action == "utm":
            return self.query_one(BreakdownTabs).current_tab == "utm" or None
        if action == "toggle_interval":
            return query.days <= 31 or None  # shown, but hourly buckets stop at 31 days
        return True

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_range(self, name: str) -> None:
        self.query_state = dataclasses.replace(self.query_state, range=name, start=None, end=None)
        self.app.track("range_changed", range=name)

    def action_custom_dates(self) -> None:
        query = self.query_state
        end = query.end or date.today().isoformat()
        start = query.start or (date.today() - timedelta(days=6)).isoformat()

        def chosen(found: tuple[str, str] | None) -> None:
            if found is not None:
                self.query_state = dataclasses.replace(self.query_state, range="custom", start=found[0], end=found[1])
                self.app.track("range_changed", range="custom", days=self.query_state.days)

        self.app.push_screen(DateRangeScreen(start, end), chosen)

    def action_add_filter(self) -> None:
        def chosen(found: tuple[str, str, str | None] | None) -> None:
            if found is not None:
                self.query_state = self.query_state.with_filter(*found)
                self.app.track("filter_changed", action="add", key=found[0])

        self.app.push_screen(FilterPickerScreen(self.client, self.project_id, self.query_state), chosen)

    def action_remove_filter(self) -> None:
        if self.query_state.filters:
            self.remove_filter(self.query_state.filters[-1][0])

    def action_clear_filters(self) -> None:
        self.query_state = dataclasses.replace(self.query_state, filters=(), labels=())
        self.app.track("filter_changed", action="clear")

    def remove_filter(self, key: str) -> None:
        self.query_state = self.query_state.without_filter(key)
        self.app.track("filter_changed", action="remove", key=key)

    def action_clear_bar(self) -> None:
        self.query_state = dataclasses.replace(self.query_state, chart_event=None)
        self.app.track("bar_cleared")

    def action_toggle_interval(self) -> None:
        interval = "day" if self.query_state.effective_interval == "hour" else "hour"
        self.query_state = dataclasses.replace(self.query_state, interval=interval)

    def action_pause(self) -> None:
        feed = self.query_one(LiveFeed)
        feed.paused = not feed.paused
        self.app.track("feed_paused" if feed.paused else "feed_resumed")

    def action_reload(self) -> None:
        self.reload()

    def action_tab(self, step: int) -> None:
        tabs = self.query_one(BreakdownTabs)
        names = [breakdown.id for breakdown in BREAKDOWNS]
        had_focus = tabs.has_focus_within
        tabs.activate(names[(names.index(tabs.current_tab) + step) % len(names)])
        if had_focus:  # the table that had it is hidden now: the new tab's table takes it
            tabs.pane().table.focus()

    def action_jump(self, pane: str) -> None:
        """Focus a main pane: the breakdowns by their table, the others themselves."""
        if pane == "breakdowns":
            self.query_one(BreakdownTabs).pane().table.focus()
        else:
            self.query_one(f"#{pane}").focus()
        self.query_one(f"#{pane}").scroll_visible(animate=False)

    def action_journey(self, view: str) -> None:
        """A funnel, retention or paths screen over this range and filters; Escape comes back here."""
        screen = {"funnel": FunnelScreen, "retention": RetentionScreen, "paths": PathsScreen}[view]
        self.app.push_screen(screen(self.client, self.project, self.memory, self.query_state))

    def action_utm(self) -> None:
        self.query_one("#pane-utm", UtmPane).switch()

    # -- widget messages ----------------------------------------------------------------------------

    def on_top_event_selected(self, message: TopEventSelected) -> None:
        self.query_state = dataclasses.replace(self.query_state, chart_event=message.event)
        self.app.track("bar_selected", event=message.event)

    def on_range_chosen(self, message: RangeChosen) -> None:
        if message.range_name == "custom":
            self.action_custom_dates()
        else:
            self.action_range(message.range_name)

    def on_filter_removed(self, message: FilterRemoved) -> None:
        self.remove_filter(message.key)

    @on(Button.Pressed, "#chart-chip")
    def chart_chip_pressed(self) -> None:
        self.action_clear_bar()

    @on(TabbedContent.TabActivated)
    def tab_activated(self) -> None:
        self.load_breakdown(self.query_state, self.query_one(BreakdownTabs).pane())
        self.refresh_bindings()

    def on_breakdown_pane_reload(self, message: BreakdownPane.Reload) -> None:
        self.load_breakdown(self.query_state, message.pane, message.cursor)

    def on_breakdown_pane_filter_chosen(self, message: BreakdownPane.FilterChosen) -> None:
        self.query_state = self.query_state.with_filter(message.key, message.value, message.label)
        self.app.track("filter_changed", action="add", key=message.key)

    def on_breakdown_pane_visitor_chosen(self, message: BreakdownPane.VisitorChosen) -> None:
        self.app.push_screen(VisitorScreen(self.client, self.project_id, self.project.name, message.distinct_id,
                                           self.query_state))

    def on_live_feed_opened(self, message: LiveFeed.Opened) -> None:
        self.app.push_screen(EventDetailScreen(message.event))


def _per(interval: str) -> str:
    return "per hour" if interval == "hour" else "per day"
