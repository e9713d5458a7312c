"""Breakdowns in tabs, one entry of BREAKDOWNS each: what it asks the API, how it shows the answer.

Only the visible tab is queried. Rows are updated by key, keeping the cursor where it was. Most tabs
are a ranked list (`Breakdown("browsers", "Browsers", "browsers", "Events")` is all a new one takes);
UTM adds a source/medium/campaign switch, Properties a key then its values, Sessions and Visitors
are lists paged by `next_cursor` where Enter opens a visitor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Button, DataTable, TabbedContent, TabPane

from pulse.protocol import RankedRows, SessionsPage, UsersPage
from pulse.tui.client import RANKED_ROWS, SESSIONS_PAGE, USERS_PAGE
from pulse.tui.state import DashboardQuery, duration, number, plain

PAGE_ROWS = "20"
UTM_DIMENSIONS = ("source", "medium", "campaign")
BACK_ROW = "\x00back"  # the row key of "‹ all keys" on the properties tab; no property key can be it


class BreakdownPane(Vertical):
    """One tab's content: a table, and what it asks the API for."""

    class Reload(Message):
        """The pane asks for another answer (another UTM dimension, a property key, the next page)."""

        def __init__(self, pane: BreakdownPane, cursor: str | None = None) -> None:
            super().__init__()
            self.pane = pane
            self.cursor = cursor

    class FilterChosen(Message):
        def __init__(self, key: str, value: str) -> None:
            super().__init__()
            self.key = key
            self.value = value

    class VisitorChosen(Message):
        def __init__(self, distinct_id: str) -> None:
            super().__init__()
            self.distinct_id = distinct_id

    def __init__(self, breakdown: Breakdown) -> None:
        super().__init__(id=f"pane-{breakdown.id}", classes="breakdown-pane")
        self.breakdown = breakdown

    @property
    def table(self) -> DataTable:
        return self.query_one(DataTable)

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id=f"table-{self.breakdown.id}", cursor_type="row", zebra_stripes=True)
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
        update_rows(self.table, {str(row.value): (plain(row.value if row.value is not None else "(none)"),
                                                  number(row.count), number(row.unique_users)) for row in rows.rows})


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

    @on(DataTable.RowSelected)
    def selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        value = event.row_key.value
        if value == BACK_ROW:
            self.open(None)
        elif self.key is None:
            self.open(value)
        elif value is not None:
            self.post_message(self.FilterChosen(f"prop.{self.key}", value))


class PagedPane(BreakdownPane):
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

    def rows(self, found) -> list[tuple[str, tuple]]:
        raise NotImplementedError

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

    @on(DataTable.RowSelected)
    def selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            distinct_id = self.visitor_of(event.row_key.value)
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


@dataclass(frozen=True)
class Breakdown:
    id: str
    title: str
    endpoint: str
    counts: str  # what the count column counts: "Events", "Sessions" (session breakdowns) or "Persons" (traits)
    pane: type[BreakdownPane] = BreakdownPane
    extra: dict[str, str] = field(default_factory=dict)  # further parameters of the endpoint


BREAKDOWNS = [
    Breakdown("pages", "Pages", "pages", "Events"),
    Breakdown("entry-pages", "Entry", "entry-pages", "Sessions"),
    Breakdown("exit-pages", "Exit", "exit-pages", "Sessions"),
    Breakdown("referrers", "Referrers", "referrers", "Sessions"),
    Breakdown("utm", "UTM", "utm", "Sessions", UtmPane),
    Breakdown("browsers", "Browsers", "browsers", "Events"),
    Breakdown("os", "OS", "os", "Events"),
    Breakdown("devices", "Devices", "devices", "Events"),
    Breakdown("properties", "Properties", "properties", "Events", PropertiesPane),
    Breakdown("sessions", "Sessions", "sessions", "Sessions", SessionsPane),
    Breakdown("users", "Visitors", "users", "Events", VisitorsPane),
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
    """Make the table show `cells` (row key -> values) in order, changing only what changed; keep the cursor."""
    keys = [row.key.value for row in table.ordered_rows]
    with table.app.batch_update():
        if keys == list(cells):
            columns = [column.key for column in table.ordered_columns]
            for key, values in cells.items():
                for column, value in zip(columns, values):
                    if table.get_cell(key, column) != value:
                        table.update_cell(key, column, value)
            return
        cursor_key = keys[table.cursor_row] if 0 <= table.cursor_row < len(keys) else None
        table.clear()
        for key, values in cells.items():
            table.add_row(*values, key=key)
        if cursor_key in cells:
            table.move_cursor(row=list(cells).index(cursor_key), animate=False)


def traits(found: object) -> Text | str:
    if not isinstance(found, dict):
        return ""
    return plain(", ".join(f"{k}={v}" for k, v in found.items()))


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%b %d %H:%M")

