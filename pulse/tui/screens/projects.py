"""Every project the token can see: events today and the last 24 hours as a sparkline; Enter opens one."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static

from pulse.protocol import ProjectRow
from pulse.tui.client import ApiFailure, PulseClient
from pulse.tui.state import number, plain
from pulse.tui.widgets.breakdown import update_rows

REFRESH_S = 30.0
BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top == 0:
        return BARS[0] * len(values)
    return "".join(BARS[min(len(BARS) - 1, round(v / top * (len(BARS) - 1)))] for v in values)


class ProjectsScreen(Screen):
    BINDINGS = [
        Binding("question_mark", "app.help", "Help"),
        Binding("enter", "open", "Open"),
        Binding("r", "reload", "Refresh"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, client: PulseClient) -> None:
        super().__init__(id="projects")
        self.client = client
        self.projects: list[ProjectRow] = []

    def compose(self) -> ComposeResult:
        yield Label("pulse · projects", id="title-bar")
        yield Static("", id="projects-error")
        table: DataTable = DataTable(id="projects-table", cursor_type="row")
        table.add_column("Project", key="name")
        table.add_column("Domain", key="domain")
        table.add_column("Today", key="today")
        table.add_column("Last 24 h", key="spark")
        yield table
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.app.track("$screen", screen="projects")
        self.action_reload()
        self.set_interval(REFRESH_S, self.action_reload)

    def on_screen_resume(self) -> None:
        self.action_reload()  # back from a dashboard: today's numbers have moved on

    def action_reload(self) -> None:
        self.load()

    @work(exclusive=True, group="projects")
    async def load(self) -> None:
        error = self.query_one("#projects-error", Static)
        try:
            self.projects = await self.client.projects()
        except ApiFailure as exc:
            error.update(f"cannot load projects: {exc.message}")
            error.add_class("-shown")
            return
        error.remove_class("-shown")
        table = self.query_one("#projects-table", DataTable)
        update_rows(table, {str(p.id): (plain(p.name), plain(p.domain or ""), number(p.events_today),
                                        sparkline(p.hourly[-24:])) for p in self.projects})
        wanted = getattr(self.app, "open_first", None)
        if wanted is not None:
            self.app.open_first = None
            found = [p for p in self.projects if p.id == wanted]
            if found:
                self.app.open_project(found[0])
            else:
                error.update(f"no project {wanted} for this token")
                error.add_class("-shown")
        if not self.projects:
            error.update("no projects yet: create one with `pulse projects create NAME`")
            error.add_class("-shown")

    def action_open(self) -> None:
        table = self.query_one("#projects-table", DataTable)
        if not self.projects or table.cursor_row < 0:
            return
        key = table.ordered_rows[table.cursor_row].key.value
        project = next(p for p in self.projects if str(p.id) == key)
        self.app.open_project(project)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()
