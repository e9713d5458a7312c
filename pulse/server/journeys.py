"""The read API's journeys, under /api/v1/projects/{project}/…: funnel, retention, paths. Each takes the usual
window and filters besides its own parameters; a bad value of any is a 400 naming it."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from aiohttp import web
from multidict import MultiDict, MultiMapping

from pulse.protocol import MAX_NAME, Cohort, Funnel, Paths, Retention
from pulse.server.analytics import _json, _project, _range, _read
from pulse.server.errors import ApiError
from pulse.server.keys import STORE
from pulse.server.params import iso, parse_filters, parse_limit, parse_window
from pulse.storage.model import PAGE_VIEW, Filters, Window

routes = web.RouteTableDef()

FUNNEL_WINDOWS = {"1h": 3_600_000, "1d": 86_400_000, "7d": 7 * 86_400_000, "30d": 30 * 86_400_000}
DEFAULT_FUNNEL_WINDOW = "1d"
MIN_STEPS, MAX_STEPS = 2, 10
# what a funnel breaks down by, besides prop.KEY and trait.KEY: a value of the first step's event
FUNNEL_BREAKDOWNS = ("browser", "os", "device", "referrer", "utm_source", "country", "language", "screen")
DEFAULT_BREAKDOWN_LIMIT = 10
PERIODS = ("day", "week")
DEFAULT_PERIOD = "day"
DEFAULT_PERIODS, MAX_PERIODS = 8, 52
DEFAULT_DEPTH, MAX_DEPTH = 3, 10
DEFAULT_PATH_LIMIT = 5
STEP_PATH = ":/"  # `page_view:/pricing`: an event on one path


def _own(query: MultiMapping[str], names: tuple[str, ...]) -> tuple[dict[str, str], Filters]:
    """The endpoint's own parameters (each at most once) and the usual filters of the rest."""
    own: dict[str, str] = {}
    rest: MultiDict[str] = MultiDict()
    for key, value in query.items():
        if key in names:
            if key in own:
                raise ApiError(400, f"{key}: given twice; it takes one value", field=key)
            own[key] = value
        else:
            rest.add(key, value)
    return own, parse_filters(rest)


def _step(field: str, text: str) -> tuple[str, str | None]:
    """(event, path or None) of a step: an event name, or `event:/path` for the event on one path."""
    name, colon, path = text.partition(STEP_PATH)
    if not name or len(name) > MAX_NAME:
        raise ApiError(400, f"{field}: a step is an event name of 1-{MAX_NAME} characters, optionally with"
                            f" :/path (page_view:/pricing), got {text!r}", field=field)
    return name, "/" + path if colon else None


def _whole(field: str, raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{field}: expected a whole number from {low} to {high}, got {raw!r}", field=field)
    return int(raw)


@routes.get("/api/v1/projects/{project}/funnel")
async def funnel(request: web.Request) -> web.Response:
    """Persons reaching each step, conversion, median time from the previous step; per breakdown value."""
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    own, filters = _own(request.query, ("steps", "window", "breakdown"))
    names = own.get("steps", "").split(",") if own.get("steps") else []
    if not MIN_STEPS <= len(names) <= MAX_STEPS:
        raise ApiError(400, f"steps: expected {MIN_STEPS} to {MAX_STEPS} steps separated by commas, got"
                            f" {len(names)}", field="steps")
    steps = [_step("steps", name) for name in names]
    span = own.get("window", DEFAULT_FUNNEL_WINDOW)
    if span not in FUNNEL_WINDOWS:
        raise ApiError(400, f"window: expected one of {', '.join(FUNNEL_WINDOWS)}, got {span!r}", field="window")
    breakdown = own.get("breakdown")
    if breakdown is not None and breakdown not in FUNNEL_BREAKDOWNS and not (
            breakdown.startswith(("prop.", "trait.")) and breakdown.partition(".")[2]):
        raise ApiError(400, f"breakdown: expected one of {', '.join(FUNNEL_BREAKDOWNS)}, prop.KEY or trait.KEY,"
                            f" got {breakdown!r}", field="breakdown")
    limit = parse_limit(request.query, default=DEFAULT_BREAKDOWN_LIMIT)
    found, groups = await _read(request, request.app[STORE].funnel(
        project.id, window, filters, steps, names, FUNNEL_WINDOWS[span], breakdown, limit))
    return _json(Funnel(**_range(project, window), window=span, steps=found, breakdown=groups))


def period_edges(window: Window, period: str, periods: int, timezone: str) -> tuple[list[int], int]:
    """(edges, cohorts): the starts of the periods (midnights, or Mondays' midnights, of the zone) from the one
    holding the window's start through the one holding its end (the cohorts), and `periods` - 1 more, then the
    end of the last; fewer where dates end."""
    tz = ZoneInfo(timezone)
    local = datetime.fromtimestamp(window.start / 1000, tz=tz).date()
    if period == "week":
        local -= timedelta(days=local.weekday())
    step = timedelta(days=7 if period == "week" else 1)
    edges: list[int] = []
    cohorts = 0
    day = local
    while True:
        edges.append(int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000))
        if edges[-1] < window.end:
            cohorts = len(edges)
        elif len(edges) > cohorts + periods - 1:
            break
        try:
            day += step
        except OverflowError:  # no period after the last one dates can hold
            break
    return edges, min(cohorts, len(edges) - 1)


@routes.get("/api/v1/projects/{project}/retention")
async def retention(request: web.Request) -> web.Response:
    """Cohorts by the period of each person's first start event, and who of them came back in each period."""
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    own, filters = _own(request.query, ("period", "periods", "start_event", "return_event"))
    period = own.get("period", DEFAULT_PERIOD)
    if period not in PERIODS:
        raise ApiError(400, f"period: expected day or week, got {period!r}", field="period")
    periods = _whole("periods", own.get("periods"), DEFAULT_PERIODS, 1, MAX_PERIODS)
    events = {}
    for field in ("start_event", "return_event"):
        name = own.get(field)
        if name is not None and not 1 <= len(name) <= MAX_NAME:
            raise ApiError(400, f"{field}: an event name of 1-{MAX_NAME} characters", field=field)
        events[field] = name
    edges, cohorts = period_edges(window, period, periods, project.timezone)
    now = time.time_ns() // 1_000_000
    found = await _read(request, request.app[STORE].retention(
        project.id, edges, cohorts, periods, events["start_event"], events["return_event"], filters, now))
    widened = Window(edges[0], edges[cohorts])
    return _json(Retention(**_range(project, widened), period=period, cohorts=[
        Cohort(start=iso(edges[c], project.timezone), persons=counts.persons, returned=counts.returned)
        for c, counts in enumerate(found)]))


@routes.get("/api/v1/projects/{project}/paths")
async def paths(request: web.Request) -> web.Response:
    """From a starting event or page, the steps sessions took next, as a tree with counts and drop-offs."""
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    own, filters = _own(request.query, ("start", "depth"))
    label = own.get("start")
    if label is None:
        raise ApiError(400, "start: required: an event name, or a path (/pricing) for page views of it",
                       field="start")
    start = (PAGE_VIEW, label) if label.startswith("/") else _step("start", label)
    shown = f"{PAGE_VIEW}:{label}" if label.startswith("/") else label
    depth = _whole("depth", own.get("depth"), DEFAULT_DEPTH, 1, MAX_DEPTH)
    limit = parse_limit(request.query, default=DEFAULT_PATH_LIMIT)
    root = await _read(request, request.app[STORE].paths(project.id, window, filters, start, shown, depth, limit))
    return _json(Paths(**_range(project, window), root=root))

