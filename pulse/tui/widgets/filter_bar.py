"""The filter bar: range presets, and a chip per active filter (click a chip, or press x, to remove it)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Label

from pulse.tui.messages import FilterRemoved, RangeChosen
from pulse.tui.state import RANGES, DashboardQuery, clean, plain


class FilterBar(Horizontal):
    def compose(self) -> ComposeResult:
        for number, name in enumerate(RANGES, 1):
            yield Button(name, id=f"range-{name}", classes="range", compact=True, tooltip=f"Last {name} ({number})")
        yield Button("custom", id="range-custom", classes="range", compact=True, tooltip="Custom dates (c)")
        yield Label("", id="range-label")
        yield Horizontal(id="chips")

    def show(self, query: DashboardQuery) -> None:
        for button in self.query(".range").results(Button):
            button.set_class(button.id == f"range-{query.range}", "-active")
        self.query_one("#range-label", Label).update(query.label if query.range == "custom" else "")
        chips = self.query_one("#chips", Horizontal)
        wanted = [(key, f"{key}={value}") for key, value in query.filters]
        current = [(str(b.name), str(b.label)) for b in chips.query(Button).results(Button)]
        if current == [(k, clean(t) + " ×") for k, t in wanted]:
            return
        chips.remove_children()
        chips.mount_all([Button(plain(text + " ×"), name=key, classes="chip", compact=True,
                                tooltip="Remove this filter") for key, text in wanted])

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.has_class("chip"):
            self.post_message(FilterRemoved(str(event.button.name)))
        elif event.button.id and event.button.id.startswith("range-"):
            self.post_message(RangeChosen(event.button.id.removeprefix("range-")))
