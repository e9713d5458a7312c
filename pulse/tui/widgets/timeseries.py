"""Events over time: this period as a line, the previous period beside it for comparison."""

from __future__ import annotations

from datetime import datetime

from textual.color import Color
from textual_plotext import PlotextPlot

from pulse.protocol import Timeseries
from pulse.tui.state import count


SHORT = 10  # rows of the chart below which its y axis is labelled at 0 and at the top only
TALL = 14  # and below which at the middle too; at four steps from TALL on


class TimeseriesChart(PlotextPlot):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.current: list[int] = []
        self.previous: list[int] = []
        self.labels: list[str] = []

    def show(self, series: Timeseries) -> None:
        self.current = [b.events for b in series.buckets]
        self.previous = [b.events for b in series.previous][:len(self.current)]
        starts = [datetime.fromisoformat(b.start) for b in series.buckets]
        spans_days = len({moment.date() for moment in starts}) > 1
        self.labels = [_label(moment, series.interval, spans_days) for moment in starts]
        self.replot()

    def on_resize(self) -> None:
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_color()
        if not self.current:
            self.refresh()
            return
        xs = list(range(1, len(self.current) + 1))
        variables = self.app.theme_variables
        now, before = _rgb(variables.get("primary")), _rgb(variables.get("foreground-muted") or variables.get("secondary"))
        if any(self.previous):
            plt.plot(xs[:len(self.previous)], self.previous, marker="dot", color=before)
        plt.plot(xs, self.current, marker="braille", color=now)
        label_width = max((len(label) for label in self.labels), default=6) + 4
        ticks = max(2, min(len(xs), self.size.width // label_width or 2))
        step = max(1, round(len(xs) / ticks))
        chosen = xs[::step]
        plt.xticks(chosen, [self.labels[x - 1] for x in chosen])
        top = max(max(self.current), max(self.previous, default=0), 1)
        plt.ylim(0, top * 1.05)
        # one label per row at most: on a short chart two labels would share a row, and which of them shows
        # is up to plotext (it changed from run to run)
        steps = 1 if self.size.height < SHORT else 2 if self.size.height < TALL else 4
        plt.yticks([top * i / steps for i in range(steps + 1)], [count(round(top * i / steps)) for i in range(steps + 1)])
        self.refresh()


def _rgb(value: str | None) -> tuple[int, int, int]:
    color = Color.parse(value or "white")
    return color.rgb


def _label(moment: datetime, interval: str, spans_days: bool) -> str:
    """Hours alone while the chart shows one day; with the date once it spans more, so no two ticks read alike."""
    if interval != "hour":
        return moment.strftime("%b %d")
    return moment.strftime("%b %d %H:%M") if spans_days else moment.strftime("%H:%M")
