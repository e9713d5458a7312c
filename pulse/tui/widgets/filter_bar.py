"""The filter bar: range presets, and a chip per active filter (click a chip, or press x, to remove it).

Chips follow the presets on their line and wrap onto further lines, so every filter stays in sight
however narrow the terminal.
"""

from __future__ import annotations

from rich.cells import cell_len
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Label

from pulse.tui.messages import FilterRemoved, RangeChosen
from pulse.tui.state import RANGES, DashboardQuery, cut, plain

CHIP_GAP = 1  # cells between chips (their right margin)


class FilterBar(Vertical):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.chips: list[tuple[str, str]] = []  # (filter key, chip text)
        self.laid_out: tuple[int, int, list[tuple[str, str]]] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="filter-line", classes="filter-line"):
            for number, name in enumerate(RANGES, 1):
                yield Button(name, id=f"range-{name}", classes="range", compact=True, tooltip=f"Last {name} ({number})")
            yield Button("custom", id="range-custom", classes="range", compact=True, tooltip="Custom dates (c)")
            yield Label("", id="range-label")

    def show(self, query: DashboardQuery) -> None:
        for button in self.query(".range").results(Button):
            button.set_class(button.id == f"range-{query.range}", "-active")
        self.query_one("#range-label", Label).update(query.label if query.range == "custom" else "")
        self.chips = [(key, query.filter_text(key, value) + " ×") for key, value in query.filters]
        self.lay_out()

    def on_mount(self) -> None:
        # The chips follow the presets and the range label, which are placed (once mounted) and change width
        # (with the dates) without the bar itself resizing: lay out again after every layout of the screen.
        self.screen.screen_layout_refresh_signal.subscribe(self, lambda _: self.lay_out())

    def lay_out(self) -> None:
        """Chips after the presets while they fit, then on as many lines below as they take."""
        first = self.query_one("#filter-line", Horizontal)
        last = first.query_one("#range-label")
        width = self.content_region.width
        taken = last.region.right + last.styles.margin.right - self.content_region.x
        if width <= 0 or taken <= 0 or self.laid_out == (width, taken, self.chips):
            return  # not placed yet (the next layout comes), or laid out as it is
        self.laid_out = (width, taken, list(self.chips))
        for chip in self.query(".chip"):
            chip.remove()
        for line in self.query(".chip-line"):
            line.remove()
        lines: list[list[Button]] = [[]]
        room = width - taken
        for key, text in self.chips:
            text = cut(text[:-2], width - 2 - CHIP_GAP - 2) + " ×"  # a chip longer than the bar is cut, its × kept
            needed = cell_len(text) + 2 + CHIP_GAP  # compact buttons pad one cell each side
            if needed > room and (lines[-1] or len(lines) == 1):
                lines.append([])
                room = width
            lines[-1].append(Button(plain(text), name=key, classes="chip", compact=True, tooltip="Remove this filter"))
            room -= needed
        first.mount_all(lines[0])
        for chips in lines[1:]:
            self.mount(Horizontal(*chips, classes="filter-line chip-line"))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.has_class("chip"):
            self.post_message(FilterRemoved(str(event.button.name)))
        elif event.button.id and event.button.id.startswith("range-"):
            self.post_message(RangeChosen(event.button.id.removeprefix("range-")))
