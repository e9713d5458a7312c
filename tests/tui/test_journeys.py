"""Funnel, retention and paths screens under the pilot, against a real server with the generated population:
what each shows equals the read API's answer for the same range, filters and parameters."""

from __future__ import annotations

import dataclasses

from pulse.tui.app import PulseApp
from pulse.tui.client import PulseClient
from pulse.tui.screens.dialogs import FilterPickerScreen
from pulse.tui.screens.journeys import (FunnelScreen, FunnelSteps, PathsScreen, RetentionScreen, breakdown_cell,
                                        path_label, retention_text, step_detail)
from pulse.tui.state import FilterMemory, FunnelQuery, PathsQuery, RetentionQuery, count, duration, percent
from pulse.protocol import FunnelStep, PathNode
from tests.tui.conftest import OPERATOR, POPULATION_QUERY
from tests.tui.test_app import api, open_dashboard, until

SIZE = (100, 40)
FILTERED = dataclasses.replace(POPULATION_QUERY, filters=(("browser", "Chrome"),))


def make_app(server, memory: FilterMemory, query=POPULATION_QUERY, **views) -> PulseApp:
    memory.put(server.url, server.project.id, query)
    for name, view in views.items():
        memory.put_view(server.url, server.project.id, name, view)
    return PulseApp(PulseClient(server.url, OPERATOR), memory=memory, refresh_s=3600)


async def open_view(pilot, app, key: str, screen_type):
    """From the dashboard, `key` opens the view; wait until it shows an answer."""
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, screen_type), f"the {screen_type.VIEW} screen")
    view = app.screen
    await until(pilot, lambda: view.loaded, f"the {view.VIEW} answer")
    await pilot.pause(0.05)
    return view


async def answered(pilot, view) -> None:
    """After a change: the new answer shown."""
    await until(pilot, lambda: view.loaded, f"the {view.VIEW} answer")
    await pilot.pause(0.05)


def shown_steps(view: FunnelScreen) -> list[list[str]]:
    return [str(option.prompt).split("\n") for option in view.query_one(FunnelSteps).options]


def expected_steps(answer: dict) -> list[list[str]]:
    """Each step's two lines, from the API's answer: persons and conversion, from previous and the median."""
    lines = []
    for index, step in enumerate(answer["steps"]):
        assert step["persons"] is not None
        detail = step_detail(FunnelStep(**step), index)
        if index:
            median = "–" if step["median_seconds"] is None else duration(step["median_seconds"])
            assert detail == f"{percent(step['from_previous'])} from previous · median {median}"
        lines.append([count(step["persons"]), percent(step["conversion"]), detail])
    return lines


def assert_funnel_shows(view: FunnelScreen, answer: dict) -> None:
    shown = shown_steps(view)
    assert len(shown) == len(answer["steps"])
    for index, ((first, second), (persons, conversion, detail), step) in enumerate(zip(shown, expected_steps(answer),
                                                                                        answer["steps"])):
        assert first.startswith(f"{index + 1}. {step['step']}")
        assert first.split()[-2:] == [persons, conversion]
        assert second.strip() == detail
    table = view.query_one("#funnel-breakdown")
    if answer["breakdown"] is None:
        assert not table.display
        return
    assert table.display
    rows = [[str(cell).strip() for cell in table.get_row_at(r)] for r in range(table.row_count)]
    assert rows == [[group["value"] if group["value"] is not None else "(none)",
                     *[breakdown_cell(FunnelStep(**s), i) for i, s in enumerate(group["steps"])]]
                    for group in answer["breakdown"]]


async def test_funnel_steps_and_breakdown_rows_equal_the_api(server, memory):
    funnel = FunnelQuery(steps=("page_view", "click", "purchase"), window="1d", breakdown="browser")
    app = make_app(server, memory, funnel=funnel)
    async with app.run_test(size=SIZE) as pilot:
        await open_dashboard(pilot, app)
        view = await open_view(pilot, app, "F", FunnelScreen)
        answer = await api(server, "funnel", {**POPULATION_QUERY.params(), **funnel.params()})
        assert answer["steps"][0]["persons"] > answer["steps"][-1]["persons"] > 0
        assert len(answer["breakdown"]) > 1
        assert_funnel_shows(view, answer)

        # the window switch: 1d -> 7d, the same numbers as the API's for 7d
        await pilot.press("w")
        assert view.view_query.window == "7d"
        await answered(pilot, view)
        assert_funnel_shows(view, await api(server, "funnel", {**POPULATION_QUERY.params(), **view.view_query.params()}))

        # the breakdown switch: browser -> os
        await pilot.press("b")
        assert view.view_query.breakdown == "os"
        await answered(pilot, view)
        answer = await api(server, "funnel", {**POPULATION_QUERY.params(), **view.view_query.params()})
        assert {g["value"] for g in answer["breakdown"]} >= {"Windows"}
        assert_funnel_shows(view, answer)


async def pick(pilot, app, key: str, value: str) -> None:
    """In the open picker: the key, then the value, as a person would (enter on each)."""
    await until(pilot, lambda: isinstance(app.screen, FilterPickerScreen), "the picker")
    picker = app.screen
    keys = picker.query_one("#picker-keys")
    await until(pilot, lambda: keys.option_count > 0, "the picker's keys")
    while picker.key != key:
        await pilot.press("down")
        await pilot.pause(0.05)
    values = picker.query_one("#picker-values")
    await until(pilot, lambda: any(o.id == value for o in values.options), f"the value {value}")
    await pilot.press("enter")
    while values.highlighted_option.id != value:
        await pilot.press("down")
    await pilot.press("enter")
    await until(pilot, lambda: not isinstance(app.screen, FilterPickerScreen), "the picker to close")


async def test_funnel_steps_chosen_through_the_picker_moved_and_removed(server, memory):
    app = make_app(server, memory, FILTERED)
    async with app.run_test(size=SIZE) as pilot:
        await open_dashboard(pilot, app)
        await pilot.press("F")
        await until(pilot, lambda: isinstance(app.screen, FunnelScreen), "the funnel screen")
        view = app.screen
        assert view.view_query.steps == () and view.query_one("#funnel-hint").display
        await pilot.press("a")
        await pick(pilot, app, "path", "/pricing")
        await pilot.press("a")
        await pick(pilot, app, "event", "signup")
        await pilot.press("a")
        await pick(pilot, app, "event", "click")
        assert view.view_query.steps == ("page_view:/pricing", "signup", "click")
        await answered(pilot, view)
        # the dashboard's filters apply
        assert_funnel_shows(view, await api(server, "funnel", {**FILTERED.params(), **view.view_query.params()}))

        # the last step up one, then the first removed
        bars = view.query_one(FunnelSteps)
        bars.highlighted = 2
        await pilot.press("shift+up")
        assert view.view_query.steps == ("page_view:/pricing", "click", "signup")
        assert bars.highlighted == 1
        bars.highlighted = 0
        await pilot.press("d")
        assert view.view_query.steps == ("click", "signup")
        await answered(pilot, view)
        assert_funnel_shows(view, await api(server, "funnel", {**FILTERED.params(), **view.view_query.params()}))
        assert memory.view(server.url, server.project.id, "funnel").steps == ("click", "signup")


def assert_retention_shows(view: RetentionScreen, answer: dict) -> None:
    table = view.query_one("#retention-table")
    assert table.row_count == len(answer["cohorts"]) > 0
    periods = max(len(c["returned"]) for c in answer["cohorts"])
    assert len(table.columns) == 2 + periods
    for index, cohort in enumerate(answer["cohorts"]):
        row = [str(cell) for cell in table.get_row_at(index)]
        assert row[:2] == [cohort["start"][:10], count(cohort["persons"])]
        cells = [retention_text(n, cohort["persons"]) for n in cohort["returned"]]
        assert row[2:] == cells + [""] * (periods - len(cells))


async def test_retention_cells_equal_the_api(server, memory):
    app = make_app(server, memory)
    async with app.run_test(size=SIZE) as pilot:
        await open_dashboard(pilot, app)
        view = await open_view(pilot, app, "R", RetentionScreen)
        assert view.view_query == RetentionQuery()
        answer = await api(server, "retention", {**POPULATION_QUERY.params(), "period": "day"})
        assert any(n for c in answer["cohorts"] for n in c["returned"][1:])  # someone came back
        assert_retention_shows(view, answer)

        await pilot.press("p")
        assert view.view_query.period == "week"
        await answered(pilot, view)
        assert_retention_shows(view, await api(server, "retention", {**POPULATION_QUERY.params(), "period": "week"}))

        # start and return events through the picker; "any event" again for the return
        await pilot.press("s")
        await pick(pilot, app, "event", "signup")
        await pilot.press("e")
        await pick(pilot, app, "event", "click")
        assert view.view_query == RetentionQuery("week", "signup", "click")
        await answered(pilot, view)
        assert_retention_shows(view, await api(server, "retention", {**POPULATION_QUERY.params(), "period": "week",
                                                                     "start_event": "signup", "return_event": "click"}))
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, FilterPickerScreen), "the picker")
        values = app.screen.query_one("#picker-values")
        await until(pilot, lambda: values.option_count > 1, "the events")
        await pilot.press("enter", "enter")  # the first value: any event
        await until(pilot, lambda: view.view_query.return_event is None, "any event as the return")
        await answered(pilot, view)
        assert_retention_shows(view, await api(server, "retention", {**POPULATION_QUERY.params(), "period": "week",
                                                                     "start_event": "signup"}))


def tree_nodes(node) -> list:
    """(depth, label, node's data) of the tree, depth first."""
    found = []

    def walk(item, depth: int) -> None:
        found.append((depth, str(item.label), item.data))
        for child in item.children:
            walk(child, depth + 1)

    walk(node, 0)
    return found


def api_nodes(root: dict) -> list:
    found = []

    def walk(item: dict, depth: int) -> None:
        node = PathNode(step=item["step"], sessions=item["sessions"], dropped=item["dropped"], other=item["other"],
                        next=[])
        found.append((depth, str(path_label(node)), (item["step"], item["sessions"], item["dropped"], item["other"])))
        for child in item["next"]:
            walk(child, depth + 1)

    walk(root, 0)
    return found


def assert_paths_show(view: PathsScreen, answer: dict) -> None:
    tree = view.query_one("#paths-tree")
    shown = [(d, label, (n.step, n.sessions, n.dropped, n.other)) for d, label, n in tree_nodes(tree.root)]
    assert shown == api_nodes(answer["root"])
    for depth, label, (step, sessions, dropped, other) in shown:
        assert label.startswith(step) and f"{count(sessions)} sessions" in label and f"{count(dropped)} ended" in label


async def test_paths_tree_equals_the_api_and_enter_starts_from_a_node(server, memory):
    app = make_app(server, memory, paths=PathsQuery("/", 2))
    async with app.run_test(size=SIZE) as pilot:
        await open_dashboard(pilot, app)
        view = await open_view(pilot, app, "P", PathsScreen)
        answer = await api(server, "paths", {**POPULATION_QUERY.params(), "start": "/", "depth": "2"})
        assert answer["root"]["step"] == "page_view:/" and answer["root"]["next"]
        assert_paths_show(view, answer)

        await pilot.press("d")  # depth 2 -> 3
        assert view.view_query.depth == 3
        await answered(pilot, view)
        answer = await api(server, "paths", {**POPULATION_QUERY.params(), "start": "/", "depth": "3"})
        assert_paths_show(view, answer)

        # Enter on the first page-view child: that page is the new start
        tree = view.query_one("#paths-tree")
        child = next(n for n in tree.root.children if n.data.step.startswith("page_view:/"))
        tree.move_cursor(child)
        await pilot.press("enter")
        start = child.data.step.removeprefix("page_view:")
        await until(pilot, lambda: view.view_query.start == start, "the new start")
        await answered(pilot, view)
        assert_paths_show(view, await api(server, "paths", {**POPULATION_QUERY.params(), "start": start, "depth": "3"}))

        # an event through the picker
        await pilot.press("s")
        await pick(pilot, app, "event", "click")
        assert view.view_query.start == "click"
        await answered(pilot, view)
        assert_paths_show(view, await api(server, "paths", {**POPULATION_QUERY.params(), "start": "click", "depth": "3"}))


async def test_each_view_is_remembered_across_a_restart(server, memory):
    app = make_app(server, memory, FILTERED, funnel=FunnelQuery(steps=("page_view", "signup")))
    async with app.run_test(size=SIZE) as pilot:
        await open_dashboard(pilot, app)
        view = await open_view(pilot, app, "F", FunnelScreen)
        await pilot.press("w", "b", "b")  # 7d, by os
        await pilot.press("escape")
        view = await open_view(pilot, app, "R", RetentionScreen)
        await pilot.press("p")
        await pilot.press("s")
        await pick(pilot, app, "event", "page_view")
        await pilot.press("escape")
        view = await open_view(pilot, app, "P", PathsScreen)
        await pilot.press("s")
        await pick(pilot, app, "path", "/docs")
        await pilot.press("d", "d")
        await pilot.press("escape")

    again = PulseApp(PulseClient(server.url, OPERATOR), memory=FilterMemory(memory.path), refresh_s=3600)
    async with again.run_test(size=SIZE) as pilot:
        dashboard = await open_dashboard(pilot, again)
        assert dashboard.query_state == FILTERED
        view = await open_view(pilot, again, "F", FunnelScreen)
        assert view.view_query == FunnelQuery(("page_view", "signup"), "7d", "os")
        assert_funnel_shows(view, await api(server, "funnel", {**FILTERED.params(), **view.view_query.params()}))
        await pilot.press("escape")
        view = await open_view(pilot, again, "R", RetentionScreen)
        assert view.view_query == RetentionQuery("week", "page_view", None)
        assert_retention_shows(view, await api(server, "retention", {**FILTERED.params(), **view.view_query.params()}))
        await pilot.press("escape")
        view = await open_view(pilot, again, "P", PathsScreen)
        assert view.view_query == PathsQuery("/docs", 5)
        assert_paths_show(view, await api(server, "paths", {**FILTERED.params(), **view.view_query.params()}))


async def test_escape_returns_to_the_dashboard_as_it_was(server, memory):
    query = dataclasses.replace(FILTERED, chart_event="click")
    app = make_app(server, memory, query, funnel=FunnelQuery(steps=("page_view", "click")))
    async with app.run_test(size=SIZE) as pilot:
        dashboard = await open_dashboard(pilot, app)
        await until(pilot, lambda: not dashboard.loading, "the numbers")
        dashboard.query_one("#breakdowns").activate("browsers")
        overview = dashboard.overview
        for key, screen_type in (("F", FunnelScreen), ("R", RetentionScreen), ("P", PathsScreen)):
            view = await open_view(pilot, app, key, screen_type)
            assert view.dashboard_query == query  # the dashboard's range and filters
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is dashboard, "the dashboard")
            assert dashboard.query_state == query
            assert dashboard.query_one("#breakdowns").current_tab == "browsers"
            assert dashboard.overview is overview or dashboard.overview == overview
