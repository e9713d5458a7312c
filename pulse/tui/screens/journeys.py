"""Funnel, retention and paths: each a screen over the dashboard's range and filters, Escape back to it.

Each is a whole screen rather than a tab of the dashboard: a funnel's bars, a cohort triangle and a tree each
need the full 80x24, and the dashboard stays underneath as it was (its range, filters, tabs, feed), so Escape
finds it unchanged. What each view shows (steps, period, start…) is kept per project beside the filters.
"""

from __future__ import annotations

import abc
import dataclasses

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.color import Color
from textual.containers import Horizontal
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Label, OptionList, Static, Tree
from textual.widgets.option_list import Option

from pulse.protocol import Funnel, FunnelStep, PathNode, Paths, ProjectRow, Retention
from pulse.tui.abstract import Abstract
from pulse.tui.client import FUNNEL, PATHS, RANKED_ROWS, RETENTION, ApiFailure, PulseClient
from pulse.tui.screens.dialogs import FilterPickerScreen
from pulse.tui.state import (FUNNEL_BREAKDOWNS, FUNNEL_WINDOWS, MAX_FUNNEL_STEPS, PATH_DEPTHS, RETENTION_PERIODS,
                             DashboardQuery, FilterMemory, FunnelQuery, PathsQuery, RetentionQuery, clean, count, cut,
                             cut_apart, duration, percent, picked_step, plain, step_start)
from pulse.tui.widgets.footer import DashboardFooter

MIN_FUNNEL_STEPS = 2  # what the funnel endpoint takes
# retention cells: a rate at or above each threshold takes that share of the accent over the background
SHADES = ((0.5, 0.85), (0.25, 0.6), (0.1, 0.4), (0.0001, 0.2))


class JourneyScreen(Screen, metaclass=Abstract):
    """What the three views share: the title bar with the dashboard's range and filters, a line of switches,
    the footer, loading and its errors, and remembering the view's query."""

    VIEW = ""  # the key in FilterMemory.VIEWS, and the screen's title
    COMMON_BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("question_mark", "app.help", "Help"),
        Binding("r", "reload", "Refresh", show=False),
        Binding("q", "app.quit", "Quit", show=False),
    ]

    def __init__(self, client: PulseClient, project: ProjectRow, memory: FilterMemory, query: DashboardQuery) -> None:
        super().__init__(id=self.VIEW)
        self.client = client
        self.project = project
        self.memory = memory
        self.dashboard_query = query
        self.view_query = memory.view(client.url, project.id, self.VIEW)
        self.loaded = False  # an answer to the current query is shown

    def compose(self) -> ComposeResult:
        query = self.dashboard_query
        with Horizontal(id="title-bar"):
            yield Label(plain(f"pulse › {self.project.name} › {self.VIEW.title()}"), id="project-name")
            filters = " ".join(query.filter_text(k, v) for k, v in query.filters)
            yield Label(plain(f"{query.label}" + (f" · {filters}" if filters else "")), id="range-text")
            yield Label("", id="load-state")
        yield Static("", id="journey-switches")
        yield from self.compose_view()
        yield DashboardFooter(frozenset())

    @abc.abstractmethod
    def compose_view(self) -> ComposeResult:
        """The view's own widgets, below the title bar."""

    def on_mount(self) -> None:
        self.app.track("$screen", screen=self.VIEW, project=self.project.id)
        self.show_switches()
        self.reload()

    def change(self, query) -> None:
        """The view's query becomes `query`: remembered for the project, and asked for."""
        self.view_query = query
        self.memory.put_view(self.client.url, self.project.id, self.VIEW, query)
        self.show_switches()
        self.reload()

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        self.loaded = False
        self.load(self.view_query)

    @abc.abstractmethod
    def load(self, query) -> None:
        """Ask for `query`'s answer and show it when it comes."""

    def show_switches(self) -> None:
        self.query_one("#journey-switches", Static).update(self.switches())

    @abc.abstractmethod
    def switches(self) -> Content:
        """The line of the view's switches (window, breakdown, period …) as they are now."""

    def state(self, text: str, *, error: bool = False) -> None:
        label = self.query_one("#load-state", Label)
        label.update(plain(text))
        label.set_class(error, "-error")

    async def ask(self, endpoint: str, params: dict[str, str], decoder):
        """The answer, or None after saying why there is none."""
        self.state("updating…")
        try:
            found = await self.client.project_get(self.project.id, endpoint,
                                                  {**self.dashboard_query.params(), **params}, decoder)
        except ApiFailure as exc:
            self.state(exc.message, error=True)
            return None
        self.state("")
        return found

    def pick(self, title: str, keys: tuple[str, ...], chosen, any_value: str | None = None) -> None:
        """The dashboard's filter picker, over `keys` only; `chosen(key, value)` gets the pick."""
        def picked(found: tuple[str, str, str | None] | None) -> None:
            if found is not None:
                chosen(found[0], found[1])

        self.app.push_screen(FilterPickerScreen(self.client, self.project.id, self.dashboard_query, keys=keys,
                                                title=title, any_value=any_value), picked)


def switch(name: str, key: str, shown: str) -> Content:
    """One switch of the view, as `name: value (key)`."""
    return Content.assemble((f"{name} ", "$foreground-muted"), (shown, "bold"), (f" ({key})  ", "$foreground-muted"))


def choices(values: tuple, current) -> Content:
    """Every value of a switch, the current one marked."""
    return Content.assemble(*[(f"{v} ", "bold reverse" if v == current else "$foreground-muted") for v in values])


def following(values: tuple, current):
    return values[(values.index(current) + 1) % len(values)] if current in values else values[0]


# -- funnel -----------------------------------------------------------------------------------------------

class FunnelSteps(OptionList):
    """The steps as bars, two lines each: persons and conversion, then from the previous step and its median time."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.steps: tuple[str, ...] = ()
        self.found: list[FunnelStep] | None = None

    def show(self, steps: tuple[str, ...], found: list[FunnelStep] | None) -> None:
        self.steps, self.found = steps, found
        self.redraw()

    def on_resize(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        highlighted = self.highlighted
        width = max(self.scrollable_content_region.width, 30)
        numbers = {s.step: s for s in self.found or []} if self.found and len(self.found) == len(self.steps) else {}
        rows = [numbers.get(step) for step in self.steps]
        names = cut_apart([clean(s) for s in self.steps], max(8, width * 2 // 5))
        name_width = max((cell_len(n) for n in names), default=8) + 4  # "1. " before, a space after
        top = max((r.persons for r in rows if r is not None), default=0) or 1
        options = []
        for index, (name, row) in enumerate(zip(names, rows)):
            label = f"{index + 1}. {name}".ljust(name_width)
            if row is None:
                options.append(Option(Content.assemble(label, ("…", "$foreground-muted"))))
                continue
            figures = f" {count(row.persons):>9} {percent(row.conversion):>6}"
            bar_width = max(width - name_width - len(figures), 1)
            filled = row.persons / top * bar_width
            bar = "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")
            detail = step_detail(row, index)
            options.append(Option(Content.assemble(
                label, (bar.ljust(bar_width), "$primary"), figures, "\n",
                (" " * 3 + detail, "$foreground-muted"))))
        with self.app.batch_update():
            self.clear_options()
            self.add_options(options)
            if options:
                self.highlighted = min(highlighted or 0, len(options) - 1)


def step_detail(row: FunnelStep, index: int) -> str:
    """A step's second line: from the previous step, and the median time it took."""
    if index == 0:
        return "persons · conversion"
    median = "–" if row.median_seconds is None else duration(row.median_seconds)
    return f"{percent(row.from_previous)} from previous · median {median}"


class FunnelScreen(JourneyScreen):
    VIEW = "funnel"
    BINDINGS = [
        *JourneyScreen.COMMON_BINDINGS,
        Binding("a", "add_step", "Add step"),
        Binding("d,delete", "remove_step", "Remove", key_display="d"),
        Binding("shift+up", "move(-1)", "Move up", show=False, key_display="⇧↑"),
        Binding("shift+down", "move(1)", "Move down", show=False, key_display="⇧↓"),
        Binding("w", "window", "Window"),
        Binding("b", "breakdown", "Breakdown"),
    ]

    view_query: FunnelQuery

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.found: Funnel | None = None

    def compose_view(self) -> ComposeResult:
        yield FunnelSteps(id="funnel-steps")
        yield Static("", id="funnel-hint")
        table: DataTable = DataTable(id="funnel-breakdown", cursor_type="row", zebra_stripes=True)
        table.display = False
        yield table

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(FunnelSteps).focus()

    def switches(self) -> Content:
        query = self.view_query
        return Content.assemble(("window ", "$foreground-muted"), choices(FUNNEL_WINDOWS, query.window),
                                ("(w)  ", "$foreground-muted"), switch("breakdown", "b", query.breakdown or "none"))

    def reload(self) -> None:
        query = self.view_query
        self.query_one(FunnelSteps).show(query.steps, None)
        hint = self.query_one("#funnel-hint", Static)
        if len(query.steps) < MIN_FUNNEL_STEPS:
            self.found = None
            hint.update(f"a adds a step: an event or a page (at least {MIN_FUNNEL_STEPS})")
            hint.display = True
            self.show_breakdown(None)
            return
        hint.display = False
        super().reload()

    @work(exclusive=True, group="funnel")
    async def load(self, query: FunnelQuery) -> None:
        found = await self.ask("funnel", query.params(), FUNNEL)
        if found is None or query != self.view_query:
            return
        self.found = found
        self.query_one(FunnelSteps).show(query.steps, found.steps)
        self.show_breakdown(found)
        self.loaded = True

    def show_breakdown(self, found: Funnel | None) -> None:
        table = self.query_one("#funnel-breakdown", DataTable)
        table.display = found is not None and found.breakdown is not None
        table.clear(columns=True)
        if not table.display:
            return
        steps = self.view_query.steps
        table.add_column(self.view_query.breakdown or "", key="value")
        names = cut_apart([clean(s) for s in steps], 14)
        for index, name in enumerate(names):
            table.add_column(f"{index + 1}. {name}", key=f"step-{index}")
        for group in found.breakdown or []:
            table.add_row(plain(cut(group.value if group.value is not None else "(none)", 24)),
                          *[Text(breakdown_cell(step, index), justify="right") for index, step in enumerate(group.steps)])

    # -- actions --------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        steps = self.view_query.steps
        if action == "add_step":
            return len(steps) < MAX_FUNNEL_STEPS or None
        if action in ("remove_step", "move"):
            return bool(steps) or None
        return True

    def action_add_step(self) -> None:
        def chosen(key: str, value: str) -> None:
            if len(self.view_query.steps) < MAX_FUNNEL_STEPS:
                self.change(dataclasses.replace(self.view_query, steps=(*self.view_query.steps, picked_step(key, value))))

        self.pick("Add a step: an event, or a page", ("event", "path"), chosen)

    def action_remove_step(self) -> None:
        index = self.query_one(FunnelSteps).highlighted
        steps = self.view_query.steps
        if index is not None and index < len(steps):
            self.change(dataclasses.replace(self.view_query, steps=steps[:index] + steps[index + 1:]))

    def action_move(self, by: int) -> None:
        bars = self.query_one(FunnelSteps)
        index = bars.highlighted
        if index is None:
            return
        moved = self.view_query.moved(index, by)
        if moved != self.view_query:
            self.change(moved)
            bars.highlighted = index + by

    def action_window(self) -> None:
        self.change(dataclasses.replace(self.view_query, window=following(FUNNEL_WINDOWS, self.view_query.window)))

    def action_breakdown(self) -> None:
        self.change(dataclasses.replace(self.view_query,
                                        breakdown=following(FUNNEL_BREAKDOWNS, self.view_query.breakdown)))


def breakdown_cell(step: FunnelStep, index: int) -> str:
    """A breakdown row's step: its persons, and after step 1 the conversion."""
    return count(step.persons) if index == 0 else f"{count(step.persons)} {percent(step.conversion)}"


# -- retention --------------------------------------------------------------------------------------------

class RetentionScreen(JourneyScreen):
    VIEW = "retention"
    BINDINGS = [
        *JourneyScreen.COMMON_BINDINGS,
        Binding("p", "period", "Day/week"),
        Binding("s", "start_event", "Start event"),
        Binding("e", "return_event", "Return event"),
    ]

    view_query: RetentionQuery

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.found: Retention | None = None

    def compose_view(self) -> ComposeResult:
        yield DataTable(id="retention-table", cursor_type="row")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#retention-table", DataTable).focus()

    def switches(self) -> Content:
        query = self.view_query
        return Content.assemble(("period ", "$foreground-muted"), choices(RETENTION_PERIODS, query.period),
                                ("(p)  ", "$foreground-muted"),
                                switch("start", "s", clean(query.start_event or "any event")),
                                switch("return", "e", clean(query.return_event or "any event")))

    @work(exclusive=True, group="retention")
    async def load(self, query: RetentionQuery) -> None:
        found = await self.ask("retention", query.params(), RETENTION)
        if found is None or query != self.view_query:
            return
        self.found = found
        self.show(found)
        self.loaded = True

    def show(self, found: Retention) -> None:
        table = self.query_one("#retention-table", DataTable)
        table.clear(columns=True)
        periods = max((len(c.returned) for c in found.cohorts), default=0)
        name = "Day" if found.period == "day" else "Week"
        table.add_column("Cohort", key="start")
        table.add_column(Text("Persons", justify="right"), key="persons")
        for index in range(periods):
            table.add_column(Text(f"{name} {index}", justify="right"), key=f"period-{index}")
        shades = self.shades()
        for cohort in found.cohorts:
            cells = [retention_cell(n, cohort.persons, shades) for n in cohort.returned]
            cells += [Text("")] * (periods - len(cells))
            table.add_row(cohort.start[:10], Text(count(cohort.persons), justify="right"), *cells)

    def shades(self) -> list[tuple[float, Style]]:
        """(lowest rate, cell style) from strongest to faintest: the theme's accent over its background."""
        variables = self.app.get_css_variables()
        background = Color.parse(variables.get("background", "#000000"))
        accent = Color.parse(variables.get("accent", "#ffa62b"))
        styles = []
        for rate, share in SHADES:
            cell = background.blend(accent, share)
            styles.append((rate, Style(color=cell.get_contrast_text().rich_color, bgcolor=cell.rich_color)))
        return styles

    def action_period(self) -> None:
        self.change(dataclasses.replace(self.view_query, period=following(RETENTION_PERIODS, self.view_query.period)))

    def action_start_event(self) -> None:
        self.pick("Start event", ("event",), lambda _, value: self.change(
            dataclasses.replace(self.view_query, start_event=value or None)), any_value="any event")

    def action_return_event(self) -> None:
        self.pick("Return event", ("event",), lambda _, value: self.change(
            dataclasses.replace(self.view_query, return_event=value or None)), any_value="any event")


def retention_rate(returned: int, persons: int) -> float:
    return returned / persons if persons else 0.0


def retention_text(returned: int, persons: int) -> str:
    """A cell of the triangle: the share of the cohort that came back in that period, in whole percent."""
    return f"{retention_rate(returned, persons) * 100:.0f}%"


def retention_cell(returned: int, persons: int, shades: list[tuple[float, Style]]) -> Text:
    rate = retention_rate(returned, persons)
    style = next((s for lowest, s in shades if rate >= lowest), Style())
    return Text(retention_text(returned, persons), style=style, justify="right")


# -- paths ------------------------------------------------------------------------------------------------

class PathsScreen(JourneyScreen):
    VIEW = "paths"
    BINDINGS = [
        *JourneyScreen.COMMON_BINDINGS,
        Binding("s", "start", "Start"),
        Binding("d", "depth", "Depth"),
        Binding("enter", "from_here", "From here", show=False, tooltip="The highlighted step as the start"),
    ]

    view_query: PathsQuery

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.found: Paths | None = None

    def compose_view(self) -> ComposeResult:
        tree: Tree[PathNode] = Tree("", id="paths-tree")
        tree.auto_expand = False  # Enter starts from the node; space folds it
        yield tree

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(Tree).focus()

    def switches(self) -> Content:
        query = self.view_query
        return Content.assemble(switch("from", "s", clean(query.start or "…")), ("depth ", "$foreground-muted"),
                                choices(PATH_DEPTHS, query.depth), ("(d)  ", "$foreground-muted"),
                                ("enter: from there", "$foreground-muted"))

    def reload(self) -> None:
        if self.view_query.start is None:
            self.first_start()
        else:
            super().reload()

    @work(exclusive=True, group="paths")
    async def first_start(self) -> None:
        """With no start chosen yet: the range's top event."""
        top = await self.ask("top-events", {"limit": "1"}, RANKED_ROWS)
        if top is not None and top.rows:
            self.change(dataclasses.replace(self.view_query, start=top.rows[0].value))
        elif top is not None:
            self.state("no events in this range")

    @work(exclusive=True, group="paths")
    async def load(self, query: PathsQuery) -> None:
        found = await self.ask("paths", query.params(), PATHS)
        if found is None or query != self.view_query:
            return
        self.found = found
        self.show(found.root)
        self.loaded = True

    def show(self, root: PathNode) -> None:
        tree = self.query_one(Tree)
        tree.reset(path_label(root), root)

        def add(parent, node: PathNode) -> None:
            for child in node.next:
                add(parent.add(path_label(child), child, expand=True, allow_expand=bool(child.next)), child)

        add(tree.root, root)
        tree.root.expand()
        tree.move_cursor(tree.root)

    def action_start(self) -> None:
        self.pick("Start from: an event, or a page", ("event", "path"),
                  lambda key, value: self.change(dataclasses.replace(self.view_query, start=value)))

    def action_depth(self) -> None:
        self.change(dataclasses.replace(self.view_query, depth=following(PATH_DEPTHS, self.view_query.depth)))

    def action_from_here(self) -> None:
        node = self.query_one(Tree).cursor_node
        if node is not None and node.data is not None and node.parent is not None:
            self.change(dataclasses.replace(self.view_query, start=step_start(node.data.step)))
            self.app.track("paths_start_changed")

    @on(Tree.NodeSelected)
    def node_selected(self, message: Tree.NodeSelected) -> None:
        message.stop()
        self.action_from_here()


def path_label(node: PathNode) -> Text:
    """A node as the tree shows it: the step, its sessions, and how many ended there or went elsewhere."""
    text = Text(cut(clean(node.step), 40), style="bold")
    text.append(f"  {count(node.sessions)} sessions")
    ways = [f"{count(node.dropped)} ended"] + ([f"{count(node.other)} other"] if node.other else [])
    text.append(f"  {' · '.join(ways)}", style="dim")
    return text
