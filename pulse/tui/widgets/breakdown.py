"""Breakdowns in tabs, one entry of BREAKDOWNS each: what it asks the API, how it shows the answer.

Only the visible tab is queried. Rows are updated by key, keeping the cursor where it was. Most tabs
are a ranked list (`Breakdown("browsers", "Browsers", "browsers", "Events", filter="browser")` is all a
new one takes) where Enter adds the row's value as that filter; UTM adds a source/medium/campaign
switch, Properties a key then its values, Sessions and Visitors are lists paged by `next_cursor` where
Enter opens a visitor, Goals shows conversions and revenue, and Bots the crawlers every other number
leaves out (under no filter: the API takes none there).
"""

from __future__ import annotations

import abc
import weakref
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from rich.cells import cell_len, set_cell_size
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Button, DataTable, Label, TabbedContent, TabPane

from pulse.protocol import Goals, Ranked, RankedRows, Revenue, SessionsPage, UsersPage
from pulse.tui.abstract import Abstract
from pulse.tui.client import GOALS, RANKED_ROWS, SESSIONS_PAGE, USERS_PAGE
from pulse.tui.state import DashboardQuery, duration, number, percent, plain

PAGE_ROWS = "20"
GOAL_ROWS = "100"  # the API's own default: every declared goal shows, reached or not
UTM_DIMENSIONS = ("source", "medium", "campaign")
BACK_ROW = "\x00back"  # the row key of "‹ all keys" on the properties tab; no property key can be it
NONE_ROW = "\x00none"  # the row key of a ranked list's "(none)": events without the value, which no filter selects


class FittedTable(DataTable):
    """A table whose rows are fitted to its width again when that changes: the first answer of the tab in view
    can come before the table is laid out, and a terminal can be resized between answers."""

    cells: dict[str, tuple] | None = None

    def on_resize(self) -> None:
        if self.cells is not None and self.size.width > 0:
            update_rows(self, self.cells)


class BreakdownPane(Vertical):
    """One tab's content: a table, and what it asks the API for."""

    class Reload(Message):
        """The pane asks for another answer (another UTM dimension, a property key, the next page)."""

        def __init__(self, pane: BreakdownPane, cursor: str | None = None) -> None:
            super().__init__()
            self.pane = pane
            self.cursor = cursor

    class FilterChosen(Message):
        def __init__(self, key: str, value: str, label: str | None = None) -> None:
            super().__init__()
            self.key = key
            self.value = value
            self.label = label  # the value's name, for the chip ("United Kingdom" for GB)

    class VisitorChosen(Message):
        def __init__(self, distinct_id: str) -> None:
            super().__init__()
            self.distinct_id = distinct_id

    def __init__(self, breakdown: Breakdown) -> None:
        super().__init__(id=f"pane-{breakdown.id}", classes="breakdown-pane")
        self.breakdown = breakdown
        self.labels: dict[str, str] = {}  # row key -> the value's name, for the filter's chip

    @property
    def table(self) -> DataTable:
        return self.query_one(DataTable)

    def compose(self) -> ComposeResult:
        table: DataTable = FittedTable(id=f"table-{self.breakdown.id}", cursor_type="row", zebra_stripes=True)
        for key, label in self.columns():
            table.add_column(label, key=key)
        yield table

    def relabel(self) -> None:
        """Columns anew (their widths follow the new labels), and no rows until the answer comes."""
        self.table.clear(columns=True)
        for key, label in self.columns():
            self.table.add_column(plain(label), key=key)

    def columns(self) -> list[tuple[str, str]]:
        return [("value", self.breakdown.title), ("count", self.breakdown.counts), ("unique_users", "Users")]

    def request(self, query: DashboardQuery, cursor: str | None = None) -> tuple[str, dict[str, str], msgspec.json.Decoder]:
        """The endpoint, parameters and decoder of this tab's answer under `query`."""
        return self.breakdown.endpoint, {**query.params(), "limit": PAGE_ROWS, **self.breakdown.extra}, RANKED_ROWS

    def reset(self) -> None:
        """A new question: nothing to forget but what the table shows."""

    def show(self, found, *, more: bool = False) -> None:
        rows: RankedRows = found
        self.labels = {row.value: row.label for row in rows.rows if row.value is not None and row.label}
        update_rows(self.table, {row_key(row): (plain(self.shown(row)), number(row.count), number(row.unique_users))
                                 for row in rows.rows})

    def shown(self, row: Ranked) -> str:
        """A row's value as the table shows it: the code and its name, or the name alone, as the tab says."""
        if row.value is None:
            return "(none)"
        if self.breakdown.named == "code" and row.label:
            return f"{row.value} {row.label}"
        if self.breakdown.named == "name" and row.label:
            return row.label
        return row.value

    def filter_key(self) -> str | None:
        """The filter Enter on a row adds, none where a row is no value of a filter."""
        return self.breakdown.filter

    @on(DataTable.RowSelected)
    def selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.choose(event.row_key.value)

    def choose(self, key: str) -> None:
        """Enter on the row `key`: its value as a filter, where the tab has one."""
        filter_key = self.filter_key()
        if filter_key is not None and key != NONE_ROW:
            self.post_message(self.FilterChosen(filter_key, key, self.labels.get(key)))


class UtmPane(BreakdownPane):
    """Sessions per UTM source, medium or campaign, switched by the buttons above the table or `u`."""

    dimension = "source"

    def compose(self) -> ComposeResult:
        with Horizontal(classes="utm-switch"):
            for dimension in UTM_DIMENSIONS:
                yield Button(dimension, id=f"utm-{dimension}", classes="range" + (" -active" if dimension == self.dimension else ""),
                             compact=True, tooltip=f"Sessions per UTM {dimension} (u switches)")
        yield from super().compose()

    def on_mount(self) -> None:
        for button in self.query(Button).results(Button):
            button.can_focus = False

    def columns(self) -> list[tuple[str, str]]:
        return [("value", f"UTM {self.dimension}"), ("count", "Sessions"), ("unique_users", "Users")]

    def filter_key(self) -> str | None:
        return f"utm_{self.dimension}"

    def request(self, query: DashboardQuery, cursor: str | None = None) -> tuple[str, dict[str, str], msgspec.json.Decoder]:
        return "utm", {**query.params(), "limit": PAGE_ROWS, "dimension": self.dimension}, RANKED_ROWS

    def switch(self, dimension: str | None = None) -> None:
        """To `dimension`, or the next one."""
        self.dimension = dimension or UTM_DIMENSIONS[(UTM_DIMENSIONS.index(self.dimension) + 1) % len(UTM_DIMENSIONS)]
        for button in self.query(Button).results(Button):
            button.set_class(button.id == f"utm-{self.dimension}", "-active")
        self.relabel()
        self.post_message(self.Reload(self))

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.switch(str(event.button.id).removeprefix("utm-"))


class PropertiesPane(BreakdownPane):
    """Property keys; Enter on a key shows its values, Enter on a value filters on `prop.KEY=VALUE`."""

    key: str | None = None

    def columns(self) -> list[tuple[str, str]]:
        return [("value", "Property" if self.key is None else f"prop.{self.key}"), ("count", "Events"),
                ("unique_users", "Users")]

    def request(self, query: DashboardQuery, cursor: str | None = None) -> tuple[str, dict[str, str], msgspec.json.Decoder]:
        endpoint = "properties" if self.key is None else f"properties/{self.key}"
        return endpoint, {**query.params(), "limit": PAGE_ROWS}, RANKED_ROWS

    def show(self, found, *, more: bool = False) -> None:
        rows: RankedRows = found
        cells = {} if self.key is None else {BACK_ROW: (Text("‹ all keys", style="italic"), "", "")}
        for row in rows.rows:
            if row.value is not None:
                cells[row.value] = (plain(row.value), number(row.count), number(row.unique_users))
        update_rows(self.table, cells)

    def open(self, key: str | None) -> None:
        self.key = key
        self.relabel()
        self.post_message(self.Reload(self))

    def choose(self, key: str) -> None:
        if key == BACK_ROW:
            self.open(None)
        elif self.key is None:
            self.open(key)
        else:
            self.post_message(self.FilterChosen(f"prop.{self.key}", key))


class PagedPane(BreakdownPane, metaclass=Abstract):
    """A list paged by `next_cursor`: the next page is asked for when the cursor reaches the last row."""

    next_cursor: str | None = None
    asked: str | None = None  # the cursor already asked for, so a page is asked for once

    def reset(self) -> None:
        """A new question: the pages read so far are of the old one."""
        self.next_cursor = self.asked = None

    def show(self, found, *, more: bool = False) -> None:
        cells = {key: values for key, values in self.rows(found)}
        if more:
            kept = {row.key.value: [self.table.get_cell(row.key, c.key) for c in self.table.ordered_columns]
                    for row in self.table.ordered_rows}
            cells = {**kept, **cells}
        self.next_cursor = found.next_cursor
        update_rows(self.table, cells)

    @abc.abstractmethod
    def rows(self, found) -> list[tuple[str, tuple]]:
        """The table's rows of one page of the answer: (key, cells) each."""

    @on(DataTable.RowHighlighted)
    def highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        table = self.table
        if (self.next_cursor and self.next_cursor != self.asked and table.row_count
                and event.cursor_row == table.row_count - 1):
            self.asked = self.next_cursor
            self.post_message(self.Reload(self, cursor=self.next_cursor))

    def visitor_of(self, key: str) -> str | None:
        return key

    def choose(self, key: str) -> None:
        distinct_id = self.visitor_of(key)
        if distinct_id is not None:
            self.post_message(self.VisitorChosen(distinct_id))


class SessionsPane(PagedPane):
    """Sessions, newest first; Enter opens the visitor's timeline."""

    def __init__(self, breakdown: Breakdown) -> None:
        super().__init__(breakdown)
        self.visitors: dict[str, str] = {}

    def columns(self) -> list[tuple[str, str]]:
        return [("started", "Started"), ("visitor", "Visitor"), ("duration", "Time"), ("pageviews", "Pages"),
                ("entry", "Entry"), ("referrer", "Referrer"), ("browser", "Browser")]

    def request(self, query: DashboardQuery, cursor: str | None = None) -> tuple[str, dict[str, str], msgspec.json.Decoder]:
        return "sessions", {**query.params(), "limit": PAGE_ROWS, **({"cursor": cursor} if cursor else {})}, SESSIONS_PAGE

    def rows(self, found) -> list[tuple[str, tuple]]:
        page: SessionsPage = found
        for row in page.rows:
            self.visitors[row.session_id] = row.distinct_id
        return [(row.session_id, (when(row.first_ts), plain(row.distinct_id), duration(row.duration_seconds),
                                  number(row.pageviews), plain(row.entry_page or ""), plain(row.referrer or ""),
                                  plain(row.browser or ""))) for row in page.rows]

    def visitor_of(self, key: str) -> str | None:
        return self.visitors.get(key)


class VisitorsPane(PagedPane):
    """Identified visitors active in the window; Enter opens one's timeline."""

    def columns(self) -> list[tuple[str, str]]:
        return [("value", "Visitor"), ("count", "Events"), ("last_seen", "Last seen"), ("traits", "Traits")]

    def request(self, query: DashboardQuery, cursor: str | None = None) -> tuple[str, dict[str, str], msgspec.json.Decoder]:
        return "users", {**query.params(), "limit": "50", **({"cursor": cursor} if cursor else {})}, USERS_PAGE

    def rows(self, found) -> list[tuple[str, tuple]]:
        page: UsersPage = found
        return [(row.distinct_id, (plain(row.distinct_id), number(row.window_events), when(row.last_seen), traits(row.traits)))
                for row in page.rows]


class GoalsPane(BreakdownPane):
    """Each goal's visitors, events, conversion rate and revenue; Enter filters on an event goal, or an exact page."""

    def __init__(self, breakdown: Breakdown) -> None:
        super().__init__(breakdown)
        self.goals: dict[str, tuple[str, str]] = {}  # row key -> (kind, goal)

    def columns(self) -> list[tuple[str, str]]:
        return [("value", "Goal"), ("count", "Visitors"), ("events", "Events"), ("rate", "Conv. %"),
                ("revenue", "Revenue")]

    def request(self, query: DashboardQuery, cursor: str | None = None) -> tuple[str, dict[str, str], msgspec.json.Decoder]:
        return "goals", {**query.params(), "limit": GOAL_ROWS}, GOALS

    def show(self, found, *, more: bool = False) -> None:
        goals: Goals = found
        self.goals = {f"{row.kind}:{row.goal}": (row.kind, row.goal) for row in goals.rows}
        update_rows(self.table, {f"{row.kind}:{row.goal}": (
            plain(row.goal), number(row.visitors), number(row.events),
            Text(percent(row.conversion_rate), justify="right"), plain(revenue(row.revenue)))
            for row in goals.rows})

    def choose(self, key: str) -> None:
        kind, goal = self.goals.get(key, ("", ""))
        if kind == "event":
            self.post_message(self.FilterChosen("event", goal))
        elif kind == "page" and not goal.endswith("*"):  # a prefix goal is no one path
            self.post_message(self.FilterChosen("path", goal))


class BotsPane(BreakdownPane):
    """Crawlers' events: left out of every other number, and asked under no filter (the API takes none)."""

    def compose(self) -> ComposeResult:
        yield Label("Left out of every other number; no filter applies.", classes="pane-note")
        yield from super().compose()

    def columns(self) -> list[tuple[str, str]]:
        return [("value", "Bot"), ("count", "Events")]

    def request(self, query: DashboardQuery, cursor: str | None = None) -> tuple[str, dict[str, str], msgspec.json.Decoder]:
        return "bots", {**query.window_params(), "limit": PAGE_ROWS}, RANKED_ROWS

    def show(self, found, *, more: bool = False) -> None:
        rows: RankedRows = found
        update_rows(self.table, {row_key(row): (plain(self.shown(row)), number(row.count)) for row in rows.rows})


@dataclass(frozen=True)
class Breakdown:
    id: str
    title: str
    endpoint: str
    counts: str  # what the count column counts: "Events", "Sessions" (session breakdowns) or "Persons" (traits)
    pane: type[BreakdownPane] = BreakdownPane
    extra: dict[str, str] = field(default_factory=dict)  # further parameters of the endpoint
    filter: str | None = None  # the filter Enter on a row adds (its value), if any
    named: str = ""  # rows with a label: "code" shows the value then its name (GB United Kingdom), "name" the name


BREAKDOWNS = [
    Breakdown("pages", "Pages", "pages", "Events", filter="path"),
    Breakdown("entry-pages", "Entry", "entry-pages", "Sessions"),
    Breakdown("exit-pages", "Exit", "exit-pages", "Sessions"),
    Breakdown("referrers", "Referrers", "referrers", "Sessions", filter="referrer"),
    Breakdown("utm", "UTM", "utm", "Sessions", UtmPane),
    Breakdown("browsers", "Browsers", "browsers", "Events", filter="browser"),
    Breakdown("os", "OS", "os", "Events", filter="os"),
    Breakdown("devices", "Devices", "devices", "Events", filter="device"),
    Breakdown("countries", "Countries", "countries", "Events", filter="country", named="code"),
    Breakdown("languages", "Languages", "languages", "Events", filter="language", named="name"),
    Breakdown("screens", "Screens", "screens", "Events", filter="screen"),
    Breakdown("properties", "Properties", "properties", "Events", PropertiesPane),
    Breakdown("goals", "Goals", "goals", "Visitors", GoalsPane),
    Breakdown("sessions", "Sessions", "sessions", "Sessions", SessionsPane),
    Breakdown("users", "Visitors", "users", "Events", VisitorsPane),
    Breakdown("bots", "Bots (excluded)", "bots", "Events", BotsPane),
]
TABS = {breakdown.id: breakdown for breakdown in BREAKDOWNS}


class BreakdownTabs(Widget):
    def compose(self) -> ComposeResult:
        with TabbedContent(id="breakdown-tabs"):
            for breakdown in BREAKDOWNS:
                with TabPane(breakdown.title, id=f"tab-{breakdown.id}"):
                    yield breakdown.pane(breakdown)

    @property
    def current_tab(self) -> str:
        return (self.query_one(TabbedContent).active or "tab-pages").removeprefix("tab-")

    def pane(self, tab: str | None = None) -> BreakdownPane:
        return self.query_one(f"#pane-{tab or self.current_tab}", BreakdownPane)

    def activate(self, tab: str) -> None:
        self.query_one(TabbedContent).active = f"tab-{tab}"


def update_rows(table: DataTable, cells: dict[str, tuple]) -> None:
    """Make the table show `cells` (row key -> values) in order, changing only what changed; keep the cursor.

    Each column is as wide as what it shows now: DataTable only ever widens a column, so a table that once
    held a longer value would otherwise keep its width, and the same rows would look different depending on
    what came before them."""
    if isinstance(table, FittedTable):
        table.cells = cells
    cells = _fitted(table, cells)
    keys = [row.key.value for row in table.ordered_rows]
    with table.app.batch_update():
        if keys == list(cells):
            columns = [column.key for column in table.ordered_columns]
            for key, values in cells.items():
                for column, value in zip(columns, values):
                    if table.get_cell(key, column) != value:
                        table.update_cell(key, column, value, update_width=True)
        else:
            cursor_key = keys[table.cursor_row] if 0 <= table.cursor_row < len(keys) else None
            table.clear()
            for key, values in cells.items():
                table.add_row(*values, key=key)
            if cursor_key in cells:
                table.move_cursor(row=list(cells).index(cursor_key), animate=False)
        for index, column in enumerate(table.ordered_columns):
            if column.auto_width:
                column.content_width = max([_width(column.label), *(_width(values[index]) for values in cells.values())])
        table.refresh()


_last_width: weakref.WeakKeyDictionary[DataTable, int] = weakref.WeakKeyDictionary()
MIN_FIRST_COLUMN = 10  # cells: a first column narrower than this is left whole, the table scrolls instead


def _fitted(table: DataTable, cells: dict[str, tuple]) -> dict[str, tuple]:
    """The first column cut with … where it would push the numbers after it past the table's edge: a country's
    name or a long path must not hide the Users column at 80 columns."""
    # a table being laid out again (the dashboard reloading) has no size for a moment: the last one holds
    if table.size.width > 0:
        _last_width[table] = table.size.width
    width = _last_width.get(table, 0) - table.styles.scrollbar_size_vertical  # room for a scrollbar, shown or not
    columns = table.ordered_columns
    if width <= 0 or not cells or len(columns) < 2:
        return cells
    padding = 2 * table.cell_padding
    others = sum(max([_width(column.label), *(_width(values[index]) for values in cells.values())]) + padding
                 for index, column in enumerate(columns) if index)
    room = width - others - padding
    if room < MIN_FIRST_COLUMN:
        return cells
    return {key: (_cut(values[0], room), *values[1:]) for key, values in cells.items()}


def _cut(value: object, room: int) -> object:
    if _width(value) <= room:
        return value
    text = value.plain if isinstance(value, Text) else str(value)
    return Text(set_cell_size(text, room - 1) + "…")


def _width(value: object) -> int:
    text = value.plain if isinstance(value, Text) else str(value)
    return max((cell_len(line) for line in text.splitlines()), default=0)


def row_key(row: Ranked) -> str:
    return NONE_ROW if row.value is None else row.value


def revenue(amounts: list[Revenue]) -> str:
    """`EUR 123.45, USD 40.65`: the sums per currency, an amount without a currency alone."""
    return ", ".join(f"{r.currency} {r.amount:,.2f}" if r.currency else f"{r.amount:,.2f}" for r in amounts)


def traits(found: object) -> Text | str:
    if not isinstance(found, dict):
        return ""
    return plain(", ".join(f"{k}={v}" for k, v in found.items()))


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%b %d %H:%M")

