"""`?`: every key of the screen underneath, once each, and what it does; scrolls when the terminal is short."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

ABOUT = ("Numbers refresh on their own every few seconds and after every change; the live feed shows "
         "events as they are committed. Click a chip or a range with the mouse, or use the keys below.")


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box", classes="dialog"):
            yield Label("Keys", classes="dialog-title")
            with VerticalScroll(id="help-scroll"):
                yield Label(ABOUT, id="help-about")
                table: DataTable = DataTable(id="help-table", cursor_type="none", show_header=False)
                table.can_focus = False  # the scroll around it takes the keys
                table.styles.height = len(self.bindings)  # every row: the scroll around it scrolls
                table.add_columns("key", "action")
                for key, description in self.bindings:
                    table.add_row(key, description)
                yield table
            yield Label("↑ ↓ scroll · escape closes", classes="dialog-hint")

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()
