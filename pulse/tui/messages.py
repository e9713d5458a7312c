"""Messages the dashboard's workers and widgets post: past-tense facts."""

from __future__ import annotations

from textual.message import Message

from pulse.protocol import Overview, RankedRows, Timeseries
from pulse.tui.client import LiveState
from pulse.tui.state import DashboardQuery


class StatsLoaded(Message):
    """Overview, time series and top events for `query` arrived."""

    def __init__(self, query: DashboardQuery, overview: Overview, series: Timeseries, top: RankedRows) -> None:
        super().__init__()
        self.query = query
        self.overview = overview
        self.series = series
        self.top = top


class BreakdownLoaded(Message):
    """A breakdown tab's answer: RankedRows, or a page of sessions or visitors (`more`: a further page)."""

    def __init__(self, query: DashboardQuery, tab: str, found: object, *, more: bool = False) -> None:
        super().__init__()
        self.query = query
        self.tab = tab
        self.found = found
        self.more = more


class LoadFailed(Message):
    """A query failed: the server said no, or could not be reached."""

    def __init__(self, what: str, status: int, message: str) -> None:
        super().__init__()
        self.what = what
        self.status = status
        self.message = message


class ConnectionChanged(Message):
    """The live feed connected, dropped, or is waiting to reconnect."""

    def __init__(self, state: LiveState) -> None:
        super().__init__()
        self.state = state


class TopEventSelected(Message):
    def __init__(self, event: str) -> None:
        super().__init__()
        self.event = event


class RangeChosen(Message):
    def __init__(self, range_name: str) -> None:
        super().__init__()
        self.range_name = range_name


class FilterRemoved(Message):
    """A chip was clicked away: a filter key, or "chart" for the selected bar."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
