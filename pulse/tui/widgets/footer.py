"""The footer, with fewer keys on narrow terminals: the keys of WIDE_ONLY show from 120 columns (`?` lists all)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


class DashboardFooter(Footer):
    def __init__(self, wide_only: frozenset[str]) -> None:
        super().__init__(show_command_palette=False)
        self.wide_only = wide_only  # actions whose keys the footer leaves out below 120 columns

    def compose(self) -> ComposeResult:
        for widget in super().compose():
            if isinstance(widget, FooterKey) and widget.action in self.wide_only:
                widget.add_class("-wide-only")
            yield widget
