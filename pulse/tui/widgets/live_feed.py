"""The live feed: committed events, newest on top, repainted at most ten times a second however fast they come.

Arriving events only go into a pending deque; a timer moves them into view and repaints once. Only the
visible lines are ever rendered (the line API), so thousands of events a second cost little.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from datetime import datetime

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from pulse.protocol import LiveEvent
from pulse.tui.state import clean

KEEP = 2000  # events kept for scrolling back
FLUSH_S = 0.1


class LiveFeed(ScrollView, can_focus=True):
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "cursor(-10)", "Page up", show=False),
        Binding("pagedown", "cursor(10)", "Page down", show=False),
        Binding("enter", "open", "Details", show=True),
    ]
    COMPONENT_CLASSES = {"live-feed--cursor", "live-feed--time", "live-feed--event", "live-feed--dim"}

    paused: reactive[bool] = reactive(False)
    cursor: reactive[int] = reactive(0)

    class Opened(Message):
        def __init__(self, event: LiveEvent) -> None:
            super().__init__()
            self.event = event

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.events: collections.deque[LiveEvent] = collections.deque(maxlen=KEEP)  # newest first
        self.pending: collections.deque[LiveEvent] = collections.deque(maxlen=KEEP)
        self.pending_total = 0  # arrived while paused (may exceed what is kept)
        self._titled_pending = 0
        self.arrived = 0
        self.skipped = 0  # events the server did not send because this client fell behind
        self.rate = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self.on_shown: Callable[[list[LiveEvent], float], None] | None = None  # for measuring lag

    def on_mount(self) -> None:
        self.set_interval(FLUSH_S, self.flush)

    def push(self, events: list[LiveEvent]) -> None:
        """Called for every live message; cheap: the timer does the work."""
        self.pending.extend(events)
        self.arrived += len(events)
        if self.paused:
            self.pending_total += len(events)

    def preload(self, events: list[LiveEvent]) -> None:
        """The last events before the feed opened (newest first), below whatever the feed already brought.

        The feed connects before they are read, so nothing committed in between is missed; an event
        that came both ways is shown once.
        """
        seen = {_identity(e) for e in (*self.events, *self.pending)}
        room = KEEP - len(self.events) - len(self.pending)
        older = [e for e in events if _identity(e) not in seen][:max(room, 0)]
        if not older:
            return
        self.events.extend(older)
        self.virtual_size = Size(0, len(self.events))
        self._update_title()
        self.refresh()

    def skip(self, count: int) -> None:
        self.skipped += count

    def flush(self) -> None:
        now = time.monotonic()
        mark, seen = self._rate_mark
        if now - mark >= 1.0:
            self.rate = (self.arrived - seen) / (now - mark)
            self._rate_mark = (now, self.arrived)
            self._update_title()
        if self.paused:
            if self.pending_total != self._titled_pending:
                self._update_title()
            return
        if not self.pending:
            return
        shown = list(self.pending)
        self.pending.clear()
        self.events.extendleft(shown)
        self.virtual_size = Size(0, len(self.events))
        self.refresh()
        if self.on_shown is not None:
            callback = self.on_shown
            self.call_after_refresh(lambda: callback(shown, time.time()))

    def watch_paused(self, paused: bool) -> None:
        self.set_class(paused, "-paused")
        if not paused:
            self.pending_total = 0
            self.flush()
        self._update_title()

    def _update_title(self) -> None:
        self._titled_pending = self.pending_total
        if self.paused:
            self.border_subtitle = f"paused · {self.pending_total:,} new"
        else:
            self.border_subtitle = (f"{self.rate:,.0f} events/s" if self.arrived
                                    else "last events · waiting for new" if self.events else "waiting for events")
        if self.skipped:
            self.border_subtitle += f" · {self.skipped:,} skipped"

    def clear(self) -> None:
        self.events.clear()
        self.pending.clear()
        self.virtual_size = Size(0, 0)
        self.refresh()

    def action_cursor(self, step: int) -> None:
        if self.events:
            self.cursor = max(0, min(len(self.events) - 1, self.cursor + step))
            self.scroll_to_region_of(self.cursor)

    def scroll_to_region_of(self, line: int) -> None:
        top = self.scroll_offset.y
        height = self.scrollable_content_region.height
        if line < top:
            self.scroll_to(y=line, animate=False)
        elif line >= top + height:
            self.scroll_to(y=line - height + 1, animate=False)

    def watch_cursor(self) -> None:
        self.refresh()

    def action_open(self) -> None:
        if 0 <= self.cursor < len(self.events):
            self.post_message(self.Opened(self.events[self.cursor]))

    def on_click(self, event) -> None:
        line = self.scroll_offset.y + event.y
        if 0 <= line < len(self.events):
            if line == self.cursor and event.chain >= 2:
                self.action_open()
            self.cursor = line

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        index = self.scroll_offset.y + y
        if index >= len(self.events):
            return Strip.blank(width, self.rich_style)
        item = self.events[index]
        base = self.rich_style
        if index == self.cursor and self.has_focus:
            base = base + self.get_component_rich_style("live-feed--cursor")
        time_style = base + self.get_component_rich_style("live-feed--time", partial=True)
        event_style = base + self.get_component_rich_style("live-feed--event", partial=True)
        dim = base + self.get_component_rich_style("live-feed--dim", partial=True)
        stamp = datetime.fromtimestamp(item.ts / 1000).strftime("%H:%M:%S")
        name_width = 14 if width < 60 else 18
        segments = [Segment(stamp + " ", time_style), Segment(_fit(item.event, name_width) + " ", event_style)]
        rest = width - 9 - name_width - 1
        if width >= 70:
            who = _fit(item.distinct_id or "", 14) + " "
            agent = _fit(" ".join(x for x in (item.browser, item.os) if x), 18)
            path_width = max(rest - 15 - 18 - 1, 4)
            segments += [Segment(_fit(item.path or "", path_width) + " ", base), Segment(who, dim), Segment(agent, dim)]
        else:
            segments.append(Segment(_fit(item.path or "", max(rest, 0)), base))
        return Strip(segments).adjust_cell_length(width, base)


def _identity(event: LiveEvent) -> tuple:
    return event.ts, event.event, event.distinct_id, event.path


def _fit(text: str, width: int) -> str:
    text = clean(text)
    if cell_len(text) > width:
        return set_cell_size(text, max(width - 1, 0)) + "…"
    return set_cell_size(text, width)
