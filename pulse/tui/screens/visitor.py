"""One visitor's timeline: who they are (traits, first and last seen) and their events in the window, newest first."""

from __future__ import annotations

from urllib.parse import quote

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static

from pulse.protocol import UserTimeline
from pulse.tui.client import USER_TIMELINE, ApiFailure, PulseClient
from pulse.tui.state import DashboardQuery, clean, plain
from pulse.tui.widgets.breakdown import update_rows, when

TIMELINE_PAGE = "100"


class VisitorScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("question_mark", "app.help", "Help"),
        Binding("q", "app.quit", "Quit", show=False),
    ]

    def __init__(self, client: PulseClient, project_id: int, project_name: str, distinct_id: str,
                 query: DashboardQuery) -> None:
        super().__init__(id="visitor")
        self.client = client
        self.project_id = project_id
        self.project_name = project_name
        self.distinct_id = distinct_id
        self.dashboard_query = query
        self.timeline: UserTimeline | None = None
        self.asked: str | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="title-bar"):
            yield Label(plain(f"pulse › {self.project_name} › {self.distinct_id}"), id="project-name")
            yield Label(plain(self.dashboard_query.label), id="range-text")
        yield Static("loading…", id="visitor-about")
        table: DataTable = DataTable(id="visitor-events", cursor_type="row", zebra_stripes=True)
        for key, label in (("time", "Time"), ("event", "Event"), ("path", "Path"), ("browser", "Browser"),
                           ("os", "OS"), ("properties", "Properties")):
            table.add_column(label, key=key)
        yield table
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.app.track("$screen", screen="visitor")
        self.query_one("#visitor-events", DataTable).focus()
        self.load()

    @work(exclusive=True, group="timeline")
    async def load(self, cursor: str | None = None) -> None:
        params = {**self.dashboard_query.window_params(), "limit": TIMELINE_PAGE, **({"cursor": cursor} if cursor else {})}
        about = self.query_one("#visitor-about", Static)
        try:
            found = await self.client.project_get(self.project_id, f"users/{quote(self.distinct_id, safe='')}", params,
                                                  USER_TIMELINE)
        except ApiFailure as exc:
            about.update(plain(exc.message))
            about.add_class("-error")
            return
        table = self.query_one("#visitor-events", DataTable)
        rows = [] if cursor is None else list(self.timeline.rows if self.timeline else [])
        rows += found.rows
        self.timeline = found if cursor is None else UserTimeline(project=found.project, from_=found.from_, to=found.to,
                                                                    user=found.user, rows=rows,
                                                                    next_cursor=found.next_cursor)
        user = found.user
        traits = ", ".join(f"{k}={v}" for k, v in (user.traits or {}).items()) or "no traits"
        more = " (more below)" if found.next_cursor else ""
        about.update(plain(f"{traits} · first seen {when(user.first_seen)} · last seen {when(user.last_seen)} · "
                           f"{len(rows):,} events in {self.dashboard_query.label}{more}"))
        update_rows(table, {row.uuid: (when(row.ts), plain(row.event), plain(row.path or ""), plain(row.browser or ""),
                                       plain(row.os or ""), plain(_properties(row.properties)))
                            for row in rows})

    @on(DataTable.RowHighlighted)
    def highlighted(self, event: DataTable.RowHighlighted) -> None:
        table = event.data_table
        cursor = self.timeline.next_cursor if self.timeline else None
        if cursor and cursor != self.asked and event.cursor_row == table.row_count - 1:
            self.asked = cursor
            self.load(cursor)


def _properties(found: dict | None) -> str:
    return ", ".join(f"{k}={clean(v)}" for k, v in (found or {}).items())
