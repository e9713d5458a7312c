"""Small dialogs: add a filter, choose custom dates, read one event's details."""

from __future__ import annotations

import json
from datetime import datetime

from rich.cells import cell_len
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from pulse.protocol import LiveEvent
from pulse.tui.client import ApiFailure, PulseClient
from pulse.tui.state import DashboardQuery, clean, count, cut, plain, valid_date

VALUE_WIDTH = 30  # cells of a value's name in the list, beside its count; longer ones end in …
# filter key -> (endpoint that lists its values, extra parameters); prop.* and trait.* are added per key
VALUE_SOURCES = {
    "event": ("top-events", {}),
    "path": ("pages", {}),
    "referrer": ("referrers", {}),
    "utm_source": ("utm", {"dimension": "source"}),
    "utm_medium": ("utm", {"dimension": "medium"}),
    "utm_campaign": ("utm", {"dimension": "campaign"}),
    "browser": ("browsers", {}),
    "os": ("os", {}),
    "device": ("devices", {}),
    "country": ("countries", {}),
    "language": ("languages", {}),
    "screen": ("screens", {}),
}

ANY_VALUE = "\x00any"  # the option id of `any_value`: no value an event or page can have


class FilterPickerScreen(ModalScreen[tuple[str, str, str | None] | None]):
    """Pick a key (traits first), then one of its values (or type one); returns (key, value, the value's name).

    Values are counted under the filters already applied but the key's own (which the pick replaces).
    """

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, client: PulseClient, project_id: int, query: DashboardQuery, *,
                 keys: tuple[str, ...] | None = None, title: str = "Add a filter", any_value: str | None = None) -> None:
        """`keys`: only these keys of VALUE_SOURCES (events and pages for a funnel step), no traits or properties;
        `any_value`: a first value standing for no value at all (`any event`), picked as ""."""
        super().__init__()
        self.client = client
        self.project_id = project_id
        self.dashboard_query = query
        self.only_keys = keys
        self.heading = title
        self.any_value = any_value
        self.key: str | None = None
        self.labels: dict[str, str] = {}  # value -> its name ("GB" -> "United Kingdom"), of the key's values shown

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box", classes="dialog"):
            yield Label(self.heading, classes="dialog-title")
            with Horizontal(id="picker-lists"):
                yield OptionList(id="picker-keys")
                yield OptionList(id="picker-values")
            yield Input(placeholder="or type a value and press enter", id="picker-input")
            yield Static("", id="picker-status")
            yield Label("enter picks · tab moves · escape cancels", classes="dialog-hint")

    def on_mount(self) -> None:
        self.load_keys()

    @work(exclusive=True, group="keys")
    async def load_keys(self) -> None:
        keys = self.query_one("#picker-keys", OptionList)
        if self.only_keys is not None:
            keys.add_options([Option(k, id=k) for k in self.only_keys])
            keys.highlighted = 0
            keys.focus()
            return
        params = self.dashboard_query.window_params()
        trait_keys: list[str] = []
        prop_keys: list[str] = []
        try:
            trait_keys = [r.value for r in (await self.client.project_get(self.project_id, "traits", params)).rows]
        except ApiFailure as exc:
            self._status(f"traits: {exc.message}")
        keys.add_options([Option(plain(f"trait.{k}"), id=f"trait.{k}") for k in trait_keys])
        keys.add_options([Option(k, id=k) for k in VALUE_SOURCES])
        keys.highlighted = 0
        keys.focus()
        try:
            prop_keys = [r.value for r in (await self.client.project_get(self.project_id, "properties", params)).rows]
        except ApiFailure as exc:
            self._status(f"properties: {exc.message}")
        keys.add_options([Option(plain(f"prop.{k}"), id=f"prop.{k}") for k in prop_keys])

    def _status(self, text: str) -> None:
        self.query_one("#picker-status", Static).update(plain(text))

    @on(OptionList.OptionHighlighted, "#picker-keys")
    def key_highlighted(self, message: OptionList.OptionHighlighted) -> None:
        if message.option.id is not None and message.option.id != self.key:
            self.key = message.option.id
            self.load_values(self.key)

    @on(OptionList.OptionSelected, "#picker-keys")
    def key_selected(self, message: OptionList.OptionSelected) -> None:
        values = self.query_one("#picker-values", OptionList)
        values.focus()
        if values.option_count:
            values.highlighted = 0

    @work(exclusive=True, group="values")
    async def load_values(self, key: str) -> None:
        values = self.query_one("#picker-values", OptionList)
        values.clear_options()
        self._status(f"loading values of {clean(key)}…")
        params = {**self.dashboard_query.without_filter(key).params(), "limit": "50"}
        if key.startswith("trait."):
            endpoint = f"traits/{key[6:]}"
        elif key.startswith("prop."):
            endpoint = f"properties/{key[5:]}"
        else:
            endpoint, extra = VALUE_SOURCES[key]
            params.update(extra)
        try:
            rows = (await self.client.project_get(self.project_id, endpoint, params)).rows
        except ApiFailure as exc:
            self._status(exc.message)
            return
        rows = [r for r in rows if r.value is not None]
        self.labels = {r.value: r.label for r in rows if r.label}
        names = [clean(r.value if r.label is None or r.label == r.value else f"{r.value} {r.label}") for r in rows]
        width = min(max((cell_len(n) for n in names), default=4), VALUE_WIDTH)
        if self.any_value is not None:
            values.add_option(Option(self.any_value, id=ANY_VALUE))
        values.add_options([Option(plain(f"{cut(name, width).ljust(width)}  {count(r.count):>8}"), id=r.value)
                            for name, r in zip(names, rows)])
        self._status(f"{len(rows)} values of {clean(key)}" if rows else f"no values of {clean(key)} in this range")

    @on(OptionList.OptionSelected, "#picker-values")
    def value_selected(self, message: OptionList.OptionSelected) -> None:
        if message.option.id == ANY_VALUE:
            self.dismiss((self.key or "", "", None))
        elif self.key is not None and message.option.id is not None:
            self.dismiss((self.key, message.option.id, self.labels.get(message.option.id)))

    @on(Input.Submitted, "#picker-input")
    def value_typed(self, message: Input.Submitted) -> None:
        if self.key is not None and message.value.strip():
            self.dismiss((self.key, message.value.strip(), None))
        elif self.key is None:
            self._status("pick a key on the left first")


class DateRangeScreen(ModalScreen[tuple[str, str] | None]):
    """Custom dates, both ends included, in the project's time zone."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, start: str, end: str) -> None:
        super().__init__()
        self.start, self.end = start, end

    def compose(self) -> ComposeResult:
        with Vertical(id="dates-box", classes="dialog"):
            yield Label("Custom dates (YYYY-MM-DD, both days included)", classes="dialog-title")
            with Horizontal(classes="dates-row"):
                yield Label("from", classes="dates-label")
                yield Input(self.start, id="dates-from", max_length=10)
            with Horizontal(classes="dates-row"):
                yield Label("to", classes="dates-label")
                yield Input(self.end, id="dates-to", max_length=10)
            yield Static("", id="dates-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply", id="dates-apply", variant="primary", compact=True)
                yield Button("Cancel", id="dates-cancel", compact=True)

    @on(Input.Submitted)
    @on(Button.Pressed, "#dates-apply")
    def apply(self) -> None:
        start = self.query_one("#dates-from", Input).value.strip()
        end = self.query_one("#dates-to", Input).value.strip()
        error = self.query_one("#dates-error", Static)
        if not valid_date(start):
            error.update(f"from: expected a date like 2026-02-10, got {start!r}")
        elif not valid_date(end):
            error.update(f"to: expected a date like 2026-02-10, got {end!r}")
        elif end < start:
            error.update("to: must not be before from")
        else:
            self.dismiss((start, end))

    @on(Button.Pressed, "#dates-cancel")
    def cancel(self) -> None:
        self.dismiss(None)


class EventDetailScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close")]

    def __init__(self, event: LiveEvent) -> None:
        super().__init__()
        self.event = event

    def compose(self) -> ComposeResult:
        item = self.event
        properties = item.properties
        if properties is not None and not isinstance(properties, dict):
            properties = json.loads(bytes(properties))
        lines = [
            ("event", item.event),
            ("time", datetime.fromtimestamp(item.ts / 1000).isoformat(sep=" ", timespec="milliseconds")),
            ("distinct id", item.distinct_id or ""),
            ("path", item.path or ""),
            ("browser", item.browser or ""), ("os", item.os or ""), ("device", item.device or ""),
        ]
        for key, value in sorted((properties or {}).items()):
            lines.append((f"prop.{key}", value if isinstance(value, str) else json.dumps(value)))
        width = max(len(clean(k)) for k, _ in lines)
        with Vertical(id="detail-box", classes="dialog"):
            yield Label(plain(f"Event: {item.event}"), classes="dialog-title")
            yield Static("\n".join(f"{clean(k).rjust(width)}  {clean(v)}" for k, v in lines), id="detail-body",
                         markup=False)
            yield Label("escape closes", classes="dialog-hint")
