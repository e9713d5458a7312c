"""One number of the overview, with its change against the previous period."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Label


class MetricCard(Widget):
    """A label, a value and its change; `-up`/`-down` classes colour the change (`-inverse` flips them)."""

    def __init__(self, label: str, *, inverse: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.label = label
        self.inverse = inverse  # for bounce rate, down is good

    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="card-label")
        with Horizontal(classes="card-line"):
            yield Label("…", classes="card-value")
            yield Label("", classes="card-change")

    def show(self, value: str, change: str = "", sign: int = 0) -> None:
        self.query_one(".card-value", Label).update(value)
        delta = self.query_one(".card-change", Label)
        delta.update(change)
        good = sign if not self.inverse else -sign
        delta.set_class(good > 0, "-up")
        delta.set_class(good < 0, "-down")

    @property
    def value(self) -> str:
        return str(self.query_one(".card-value", Label).content)
