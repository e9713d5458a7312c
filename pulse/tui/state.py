"""What a dashboard shows (range, filters, interval, the selected bar), remembered per project between runs.

No Textual here, so the query state and its persistence are plain, testable Python.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import platformdirs
from rich.cells import cell_len, set_cell_size
from rich.text import Text

RANGES = ("24h", "7d", "30d", "90d")
FILTER_KEYS = ("event", "path", "referrer", "utm_source", "utm_medium", "utm_campaign", "browser", "os", "device",
               "country", "language", "screen")


@dataclass(frozen=True, slots=True)
class DashboardQuery:
    range: str = "7d"  # one of RANGES, or "custom" with start/end
    start: str | None = None  # ISO dates, both ends included
    end: str | None = None
    filters: tuple[tuple[str, str], ...] = ()  # ("event", "signup"), ("trait.gender", "Female"), …
    interval: str = "auto"  # "auto" | "hour" | "day"
    chart_event: str | None = None  # the selected top-events bar: the time chart shows that event only
    labels: tuple[tuple[str, str], ...] = ()  # (filter key, the name of its value): ("country", "United Kingdom")

    def window_params(self) -> dict[str, str]:
        if self.range == "custom" and self.start and self.end:
            return {"from": self.start, "to": self.end}
        return {"range": self.range if self.range in RANGES else "7d"}

    def params(self) -> dict[str, str]:
        return {**self.window_params(), **dict(self.filters)}

    def timeseries_params(self) -> dict[str, str]:
        params = {**self.params(), "interval": self.effective_interval}
        if self.chart_event is not None:
            params["event"] = self.chart_event
        return params

    @property
    def days(self) -> float:
        if self.range == "custom" and self.start and self.end:
            return (date.fromisoformat(self.end) - date.fromisoformat(self.start)).days + 1
        return {"24h": 1, "7d": 7, "30d": 30, "90d": 90}.get(self.range, 7)

    @property
    def effective_interval(self) -> str:
        if self.interval == "hour" and self.days <= 31:
            return "hour"
        if self.interval == "day":
            return "day"
        return "hour" if self.days <= 2 else "day"

    @property
    def label(self) -> str:
        if self.range == "custom":
            return f"{self.start} → {self.end}"
        return f"last {self.range}"

    def with_filter(self, key: str, value: str, label: str | None = None) -> DashboardQuery:
        """`key=value` in place of any other value of `key` (the API takes one per key), named `label` if given."""
        kept = tuple((k, v) for k, v in self.filters if k != key)
        labels = tuple((k, n) for k, n in self.labels if k != key) + (((key, label),) if label else ())
        return dataclasses.replace(self, filters=(*kept, (key, value)), labels=labels)

    def without_filter(self, key: str) -> DashboardQuery:
        return dataclasses.replace(self, filters=tuple((k, v) for k, v in self.filters if k != key),
                                   labels=tuple((k, n) for k, n in self.labels if k != key))

    def filter_text(self, key: str, value: str) -> str:
        """A filter as its chip says it: `country=GB United Kingdom`, the value's name after its code."""
        label = dict(self.labels).get(key)
        return clean(f"{key}={value}" + (f" {label}" if label and label != value else ""))

    def to_json(self) -> dict:
        return {"range": self.range, "start": self.start, "end": self.end, "filters": [list(f) for f in self.filters],
                "interval": self.interval, "chart_event": self.chart_event, "labels": dict(self.labels)}

    @classmethod
    def from_json(cls, raw: object) -> DashboardQuery:
        """Whatever was remembered, as far as it still makes sense; anything else falls back to defaults."""
        if not isinstance(raw, dict):
            return cls()
        query = cls()
        if raw.get("range") in RANGES:
            query = dataclasses.replace(query, range=raw["range"])
        elif raw.get("range") == "custom" and valid_date(raw.get("start")) and valid_date(raw.get("end")):
            query = dataclasses.replace(query, range="custom", start=raw["start"], end=raw["end"])
        filters = raw.get("filters")
        labels = raw.get("labels") if isinstance(raw.get("labels"), dict) else {}
        if isinstance(filters, list):
            for item in filters:
                if (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
                        and valid_filter_key(item[0])):
                    label = labels.get(item[0])
                    query = query.with_filter(item[0], item[1], label if isinstance(label, str) else None)
        if raw.get("interval") in ("auto", "hour", "day"):
            query = dataclasses.replace(query, interval=raw["interval"])
        if isinstance(raw.get("chart_event"), str):
            query = dataclasses.replace(query, chart_event=raw["chart_event"])
        return query


FUNNEL_WINDOWS = ("1h", "1d", "7d", "30d")
FUNNEL_BREAKDOWNS = (None, "browser", "os", "device", "referrer", "utm_source", "country")
MAX_FUNNEL_STEPS = 10  # what the funnel endpoint takes
RETENTION_PERIODS = ("day", "week")
PATH_DEPTHS = (1, 2, 3, 4, 5)
PAGE_STEP = "page_view:"  # a funnel step on one path: `page_view:/pricing`


@dataclass(frozen=True, slots=True)
class FunnelQuery:
    steps: tuple[str, ...] = ()  # event names, or `page_view:/path`
    window: str = "1d"  # one of FUNNEL_WINDOWS: how long after step 1 the last step may come
    breakdown: str | None = None  # one of FUNNEL_BREAKDOWNS

    def params(self) -> dict[str, str]:
        params = {"steps": ",".join(self.steps), "window": self.window}
        if self.breakdown is not None:
            params["breakdown"] = self.breakdown
        return params

    def moved(self, index: int, by: int) -> FunnelQuery:
        """Step `index` swapped with its neighbour `by` (-1 up, 1 down); as it was at either end."""
        other = index + by
        if not (0 <= index < len(self.steps) and 0 <= other < len(self.steps)):
            return self
        steps = list(self.steps)
        steps[index], steps[other] = steps[other], steps[index]
        return dataclasses.replace(self, steps=tuple(steps))

    def to_json(self) -> dict:
        return {"steps": list(self.steps), "window": self.window, "breakdown": self.breakdown}

    @classmethod
    def from_json(cls, raw: object) -> FunnelQuery:
        if not isinstance(raw, dict):
            return cls()
        steps = raw.get("steps")
        steps = tuple(s for s in steps if isinstance(s, str) and s)[:MAX_FUNNEL_STEPS] if isinstance(steps, list) else ()
        return cls(steps=steps, window=raw["window"] if raw.get("window") in FUNNEL_WINDOWS else "1d",
                   breakdown=raw.get("breakdown") if raw.get("breakdown") in FUNNEL_BREAKDOWNS else None)


@dataclass(frozen=True, slots=True)
class RetentionQuery:
    period: str = "day"  # one of RETENTION_PERIODS
    start_event: str | None = None  # None: any event
    return_event: str | None = None

    def params(self) -> dict[str, str]:
        params = {"period": self.period}
        if self.start_event is not None:
            params["start_event"] = self.start_event
        if self.return_event is not None:
            params["return_event"] = self.return_event
        return params

    def to_json(self) -> dict:
        return {"period": self.period, "start_event": self.start_event, "return_event": self.return_event}

    @classmethod
    def from_json(cls, raw: object) -> RetentionQuery:
        if not isinstance(raw, dict):
            return cls()
        events = [raw.get(k) if isinstance(raw.get(k), str) and raw.get(k) else None
                  for k in ("start_event", "return_event")]
        return cls(raw["period"] if raw.get("period") in RETENTION_PERIODS else "day", *events)


@dataclass(frozen=True, slots=True)
class PathsQuery:
    start: str | None = None  # an event name, or `/path` for page views of it; None until one is chosen
    depth: int = 3  # one of PATH_DEPTHS

    def params(self) -> dict[str, str]:
        return {"start": self.start or "", "depth": str(self.depth)}

    def to_json(self) -> dict:
        return {"start": self.start, "depth": self.depth}

    @classmethod
    def from_json(cls, raw: object) -> PathsQuery:
        if not isinstance(raw, dict):
            return cls()
        start = raw.get("start") if isinstance(raw.get("start"), str) and raw.get("start") else None
        return cls(start, raw["depth"] if raw.get("depth") in PATH_DEPTHS else 3)


def step_start(step: str) -> str:
    """A paths node's step as a paths start: `page_view:/pricing` is `/pricing`, an event name itself."""
    return step[len(PAGE_STEP):] if step.startswith(PAGE_STEP + "/") else step


def picked_step(key: str, value: str) -> str:
    """A pick of the filter picker as a funnel step: an event name, or `page_view:/path` for a page."""
    return f"{PAGE_STEP}{value}" if key == "path" else value


# what each view remembers per project, beside the dashboard's query, under these keys
VIEWS = {"funnel": FunnelQuery, "retention": RetentionQuery, "paths": PathsQuery}


def valid_date(raw: object) -> bool:
    if not isinstance(raw, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
        return False
    try:
        date.fromisoformat(raw)
    except ValueError:
        return False
    return True


def valid_filter_key(key: str) -> bool:
    return key in FILTER_KEYS or (key.startswith(("prop.", "trait.")) and len(key.split(".", 1)[1]) > 0)


def config_path() -> Path:
    return Path(platformdirs.user_config_dir("pulse")) / "tui.json"


class FilterMemory:
    """The last query per server and project, in a small JSON file under the user's config directory."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_path()

    def _load(self) -> dict:
        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def get(self, server: str, project_id: int) -> DashboardQuery:
        return DashboardQuery.from_json(self._load().get(f"{server}#{project_id}"))

    def put(self, server: str, project_id: int, query: DashboardQuery) -> None:
        self._save(server, project_id, query.to_json())

    def view(self, server: str, project_id: int, name: str):
        """What the view `name` (a key of VIEWS) showed last for this project: its steps, period, start…"""
        kept = self._load().get(f"{server}#{project_id}")
        return VIEWS[name].from_json(kept.get(name) if isinstance(kept, dict) else None)

    def put_view(self, server: str, project_id: int, name: str, query: FunnelQuery | RetentionQuery | PathsQuery) -> None:
        self._save(server, project_id, {name: query.to_json()})

    def _save(self, server: str, project_id: int, update: dict) -> None:
        """`update` over what is kept for the project: the dashboard's query and each view's, side by side."""
        found = self._load()
        kept = found.get(f"{server}#{project_id}")
        found[f"{server}#{project_id}"] = {**(kept if isinstance(kept, dict) else {}), **update}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(found, indent=1))
            os.replace(temporary, self.path)
        except OSError:
            pass  # remembering is a convenience: a read-only home must not break the dashboard


# -- formatting -------------------------------------------------------------------------------------

_CONTROL = dict.fromkeys([*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)], "�")
_CONTROL[0x09] = " "


def clean(text: object) -> str:
    """Text from events as it may be shown: control characters (terminal escapes) replaced, one line."""
    return str(text).translate(_CONTROL)


def plain(text: object) -> Text:
    """Text from events for a widget: cleaned, and never read as markup."""
    return Text(clean(text))


def count(value: float) -> str:
    value = float(value)
    if abs(value) >= 10_000_000:
        return f"{value / 1_000_000:.1f}M"
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:.2f}M"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.1f}"


def number(value: float) -> Text:
    """A count for a table cell: right-aligned."""
    return Text(count(value), justify="right")


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def percent(value: float) -> str:
    return f"{value * 100:.1f}%"


# the previous period must hold at least this many events for a percentage change to mean anything
MIN_COMPARABLE_EVENTS = 20


def change(current: float, previous: float, previous_events: int) -> tuple[str, int]:
    """The change against the previous period as text, and its sign (1 up, -1 down, 0 flat, new or none).

    `new` when there was nothing before and there is now; nothing at all when the previous period
    held fewer than MIN_COMPARABLE_EVENTS events, where a percentage would be noise.
    """
    if previous == 0:
        return ("new" if current else ""), 0
    if previous_events < MIN_COMPARABLE_EVENTS:
        return "", 0
    delta = (current - previous) / previous
    if abs(delta) < 0.0005:
        return "±0%", 0
    arrow, sign = ("▲", 1) if delta > 0 else ("▼", -1)
    if delta >= 9.995:  # past +999%: as a multiple, so the card stays narrow
        return f"{arrow}{current / previous:,.0f}×", sign
    return (f"{arrow}{abs(delta) * 100:.0f}%" if abs(delta) >= 0.1 else f"{arrow}{abs(delta) * 100:.1f}%"), sign


def cut(text: str, width: int) -> str:
    """`text` in at most `width` cells, an ellipsis where it was cut."""
    if cell_len(text) <= width:
        return text
    return set_cell_size(text, max(width - 1, 0)) + "…"


def cut_apart(names: list[str], width: int) -> list[str]:
    """Names cut to `width` cells so that different names still read differently.

    Names are cut at the end; where that makes two of them alike, both keep their head and as much
    of their tail as tells them apart (`newcomer_…_signup`, `newcomer_…_search`).
    """
    shown = [cut(name, width) for name in names]
    for tail in range(1, width - 1):
        clashes = {s for s in shown if sum(1 for t in shown if t == s) > 1}
        if not clashes:
            break
        head = max(width - 1 - tail, 1)
        shown = [_middle(name, head, width - 1 - head) if short in clashes else short
                 for name, short in zip(names, shown)]
    return shown


def _middle(text: str, head: int, tail: int) -> str:
    if cell_len(text) <= head + tail + 1:
        return text
    end = ""
    for char in reversed(text):
        if cell_len(char + end) > tail:
            break
        end = char + end
    return set_cell_size(text, head) + "…" + end
