"""Events over time: this period as a line, the previous period beside it for comparison."""

from __future__ import annotations

from datetime import datetime

from textual.color import Color
from textual_plotext import PlotextPlot

from pulse.protocol import Timeseries
from pulse.tui.state import count


class TimeseriesChart(PlotextPlot):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.current: list[int] = []
        self.previous: list[int] = []
        self.labels: list[str] = []

    def show(self, series: Timeseries) -> None:
        self.current = [b.events for b in series.buckets]
        self.previous = [b.events for b in series.previous][:len(self.current)]
        self.labels = [_label(b.start, series.interval) for b in series.buckets]
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
        ticks = max(2, min(len(xs), self.size.width // 12 or 2))
        step = max(1, round(len(xs) / ticks))
        chosen = xs[::step]
        plt.xticks(chosen, [self.labels[x - 1] for x in chosen])
        top = max(max(self.current), max(self.previous, default=0), 1)
        plt.ylim(0, top * 1.05)
        steps = 2 if self.size.height < 14 else 4
        plt.yticks([top * i / steps for i in range(steps + 1)], [count(round(top * i / steps)) for i in range(steps + 1)])
        self.refresh()


def _rgb(value: str | None) -> tuple[int, int, int]:
    color = Color.parse(value or "white")
    return color.rgb


def _label(start: str, interval: str) -> str:
    moment = datetime.fromisoformat(start)
    return moment.strftime("%H:%M") if interval == "hour" else moment.strftime("%b %d")
