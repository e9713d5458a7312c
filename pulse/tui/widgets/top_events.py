"""Top events as horizontal bars; Enter (or a click) on a bar narrows the time chart to that event."""

from __future__ import annotations

from rich.cells import cell_len
from textual.content import Content
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from pulse.protocol import Ranked
from pulse.tui.messages import TopEventSelected
from pulse.tui.state import clean, count, cut_apart


class TopEventsChart(OptionList):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: list[Ranked] = []
        self.selected_event: str | None = None

    def show(self, rows: list[Ranked], selected: str | None) -> None:
        self.rows, self.selected_event = rows, selected
        self.redraw()

    def on_resize(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        highlighted = self.highlighted_option.id if self.highlighted_option is not None else None
        width = max(self.scrollable_content_region.width, 20)
        top = max((r.count for r in self.rows), default=1) or 1
        name_width = min(max((cell_len(clean(r.value)) for r in self.rows), default=8), max(8, width * 2 // 5))
        value_width = max((len(count(r.count)) for r in self.rows), default=1)
        names = cut_apart([clean(r.value) for r in self.rows], name_width)
        options = []
        for row, name in zip(self.rows, names):
            value = count(row.count).rjust(value_width)
            bar_width = max(width - name_width - value_width - 3, 1)
            filled = row.count / top * bar_width
            bar = "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")
            text = Content.assemble(
                (name + " " * (name_width - cell_len(name)), "bold" if row.value == self.selected_event else ""),
                " ", value, " ", (bar, "$primary" if row.value != self.selected_event else "$accent"),
            )
            options.append(Option(text, id=row.value))
        with self.app.batch_update():
            self.clear_options()
            self.add_options(options)
            if highlighted is not None and any(r.value == highlighted for r in self.rows):
                self.highlighted = self.get_option_index(highlighted)
            elif self.rows:
                self.highlighted = 0

    def on_option_list_option_selected(self, message: OptionList.OptionSelected) -> None:
        message.stop()
        if message.option.id is not None:
            self.post_message(TopEventSelected(message.option.id))

