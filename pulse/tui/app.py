"""PulseApp: the projects screen, then a dashboard per project. The data source is a constructor argument."""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import App
from textual.binding import Binding

from pulse.protocol import ProjectRow
from pulse.tui.client import PulseClient, SelfTracker
from pulse.tui.screens.dashboard import DashboardScreen
from pulse.tui.screens.help import HelpScreen
from pulse.tui.screens.projects import ProjectsScreen
from pulse.tui.state import FilterMemory

TRACK_FLUSH_S = 2.0


class PulseApp(App[None]):
    CSS_PATH = "pulse.tcss"
    TITLE = "pulse"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]
    BINDINGS = [
        Binding("question_mark", "help", "Help", show=False),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, client: PulseClient, *, memory: FilterMemory | None = None,
                 tracker: SelfTracker | None = None, open_project: int | None = None,
                 refresh_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.clock = clock  # for "updated at"; tests fix it
        self.client = client
        self.memory = memory or FilterMemory()
        self.tracker = tracker
        self.open_first = open_project
        self.refresh_s = refresh_s

    def on_mount(self) -> None:
        self.push_screen(ProjectsScreen(self.client))
        if self.tracker is not None:
            self.set_interval(TRACK_FLUSH_S, self.flush_tracking)

    def open_project(self, project: ProjectRow) -> None:
        extra = {} if self.refresh_s is None else {"refresh_s": self.refresh_s}
        self.push_screen(DashboardScreen(self.client, project, self.memory, **extra))

    def track(self, name: str, /, **properties: object) -> None:
        if self.tracker is not None:
            self.tracker.track(name, **properties)

    async def flush_tracking(self) -> None:
        if self.tracker is not None:
            await self.tracker.flush()

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        seen: dict[str, str] = {}  # key as shown -> what it does, each key once
        for binding in (*self.screen.BINDINGS, *self.BINDINGS):
            if isinstance(binding, Binding) and binding.description and binding.action != "help":
                seen.setdefault(binding.key_display or self.get_key_display(binding), binding.tooltip or binding.description)
        self.push_screen(HelpScreen(list(seen.items())))

    async def on_unmount(self) -> None:
        if self.tracker is not None:
            await self.tracker.flush()
            await self.tracker.close()
        await self.client.close()
