"""The read API, under /api/v1/projects/{project}/…, for read tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from aiohttp import web
from msgspec import Struct, structs

from pulse.protocol import (
    Bucket, Counts, EventsPage, Goals, Overview, ProjectList, ProjectRow, Ranked, RankedRows, SessionsPage,
    Timeseries, UsersPage, UserTimeline, json_encoder,
)
from pulse.server.errors import ApiError
from pulse.server.geo import country_name, language_name
from pulse.server.keys import KEYRING, STORE
from pulse.server.params import (
    OTHER_PARAMS, bucket_bounds, iso, parse_filters, parse_interval, parse_limit, parse_window,
)
from pulse.storage.model import EVENT_BREAKDOWNS, SESSION_BREAKDOWNS, Cursor, Project, ReadStopped, Window

routes = web.RouteTableDef()
T = TypeVar("T")

CLIENT_CHECK_S = 0.25  # how often a running read looks whether its client is still connected
CLIENT_GONE = 499  # the status logged for a request whose client left before the answer (as nginx logs it)


async def _read(request: web.Request, question: Awaitable[T]) -> T:
    """The store's answer to `question`, stopped when the client disconnects: aiohttp does not cancel a handler
    then, and a read nobody waits for would hold a reader until its end."""
    work = asyncio.ensure_future(question)
    try:
        while True:
            done, _ = await asyncio.wait((work,), timeout=CLIENT_CHECK_S)
            if done:
                return work.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ApiError(CLIENT_GONE, "the client closed the connection; its query was stopped")
    except ReadStopped:
        raise ApiError(503, "the server is shutting down; the query was stopped",
                       headers={"Retry-After": "5"}) from None
    finally:
        work.cancel()  # stops the read unless it is done


async def stop_reads(app: web.Application) -> None:
    """At shutdown (on_shutdown, before aiohttp waits for running handlers): stop the reads in progress, which
    answer 503, so that no read holds up the exit."""
    app[STORE].stop_reads()


# what a share link's token may read: the web dashboard's aggregates, never rows about single visitors (events,
# users, sessions) nor the property and trait lists, whose values may name people
SHARED = frozenset(f"/api/v1/projects/{{project}}/{name}" for name in (
    "overview", "timeseries", "top-events", *EVENT_BREAKDOWNS, "entry-pages", "exit-pages", "referrers", "utm",
    "goals"))


def _project(request: web.Request) -> Project:
    raw = request.match_info["project"]
    if not raw.isdigit():
        raise ApiError(404, f"no project {raw!r}: projects are addressed by numeric id")
    shared = request.match_info.route.resource.canonical in SHARED
    return request.app[KEYRING].read(request, int(raw), shared=shared)


def _range(project: Project, window: Window) -> dict[str, Any]:
    """The fields every answer but the projects list starts with (Ranged's): the project and the window."""
    return {"project": project.id, "from_": iso(window.start, project.timezone),
            "to": iso(window.end, project.timezone)}


def _json(body: Struct) -> web.Response:
    return web.Response(body=json_encoder.encode(body), content_type="application/json", charset="utf-8")


def _cursor_text(cursor: Cursor | None) -> str | None:
    """A page's cursor as the API gives it out (and _cursor reads it back)."""
    return None if cursor is None else f"{cursor[0]}.{cursor[1]}"


@routes.get("/api/v1/projects")
async def projects(request: web.Request) -> web.Response:
    """The projects this token can see, with events today and per hour over the last 24 hours."""
    now = time.time_ns() // 1_000_000
    day = Window(now - 86_400_000, now)
    found = []
    for project in request.app[KEYRING].readable(request):
        today = parse_window({"from": datetime.now(ZoneInfo(project.timezone)).date().isoformat()},
                             project.timezone, now_ms=now)
        bounds = bucket_bounds(day, "hour", project.timezone)
        summary = await _read(request, request.app[STORE].project_summary(project.id, today, bounds))
        found.append(ProjectRow(id=project.id, name=project.name, domain=project.domain, timezone=project.timezone,
                                events_today=summary.events_today, hourly=summary.hourly))
    return _json(ProjectList(found))


@routes.get("/api/v1/projects/{project}/overview")
async def overview(request: web.Request) -> web.Response:
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    filters = parse_filters(request.query)
    now = time.time_ns() // 1_000_000
    found = await _read(request, request.app[STORE].overview(project.id, window, filters, now))
    return _json(Overview(**_range(project, window), **structs.asdict(found)))


@routes.get("/api/v1/projects/{project}/timeseries")
async def timeseries(request: web.Request) -> web.Response:
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    filters = parse_filters(request.query)
    interval = parse_interval(request.query, window, project.timezone)
    bounds = bucket_bounds(window, interval, project.timezone)
    shift = window.end - window.start
    store = request.app[STORE]
    current = await _read(request, store.timeseries(project.id, bounds, filters))
    before = [b - shift for b in bounds]
    previous = await _read(request, store.timeseries(project.id, before, filters))
    return _json(Timeseries(**_range(project, window), interval=interval,
                            buckets=_buckets(bounds, current, project.timezone),
                            previous=_buckets(before, previous, project.timezone)))


def _buckets(starts: list[int], counts: list[Counts], timezone: str) -> list[Bucket]:
    return [Bucket(start=iso(start, timezone), events=c.events, unique_users=c.unique_users, sessions=c.sessions)
            for start, c in zip(starts, counts)]


# breakdowns whose values have names, given as each row's label
LABELS = {"countries": country_name, "languages": language_name}


async def _rows(request: web.Request, question: Callable[..., Awaitable[list[Ranked]]], *args,
                default_limit: int = 10, label: Callable[[str], str | None] | None = None) -> web.Response:
    """RankedRows of `question(project, window, filters, *args, limit)`: breakdowns, keys and values; each row
    labelled by `label(value)` when given."""
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    rows = await _read(request, question(project.id, window, parse_filters(request.query), *args,
                                         parse_limit(request.query, default=default_limit)))
    if label is not None:
        for row in rows:
            row.label = None if row.value is None else label(row.value)
    return _json(RankedRows(**_range(project, window), rows=rows))


@routes.get("/api/v1/projects/{project}/top-events")
async def top_events(request: web.Request) -> web.Response:
    return await _rows(request, request.app[STORE].top_events)


async def _breakdown(request: web.Request, dimension: str) -> web.Response:
    return await _rows(request, request.app[STORE].breakdown, dimension, label=LABELS.get(dimension))


def _breakdown_route(path: str, dimension: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return await _breakdown(request, dimension)

    handler.__name__ = dimension.replace("-", "_")
    routes.get(f"/api/v1/projects/{{project}}/{path}")(handler)


for _dimension in (*EVENT_BREAKDOWNS, "entry-pages", "exit-pages", "referrers"):
    _breakdown_route(_dimension, _dimension)


@routes.get("/api/v1/projects/{project}/utm")
async def utm(request: web.Request) -> web.Response:
    dimension = request.query.get("dimension", "source")
    if f"utm_{dimension}" not in SESSION_BREAKDOWNS:
        raise ApiError(400, f"dimension: expected source, medium or campaign, got {dimension!r}", field="dimension")
    return await _breakdown(request, f"utm_{dimension}")


def _cursor(request: web.Request) -> Cursor | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    parts = raw.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ApiError(400, f"cursor: not a cursor this API gave out: {raw!r}", field="cursor")
    return int(parts[0]), int(parts[1])


async def _page(request: web.Request, question: Callable[..., Awaitable[T]]) -> tuple[Project, Window, T]:
    """The project, the window and `question(project, window, filters, limit, cursor)`: a page of a list."""
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    found = await _read(request, question(project.id, window, parse_filters(request.query),
                                          parse_limit(request.query, default=50), _cursor(request)))
    return project, window, found


@routes.get("/api/v1/projects/{project}/sessions")
async def sessions(request: web.Request) -> web.Response:
    project, window, (aggregates, rows, after) = await _page(request, request.app[STORE].sessions)
    return _json(SessionsPage(**_range(project, window), aggregates=aggregates, rows=rows,
                              next_cursor=_cursor_text(after)))


@routes.get("/api/v1/projects/{project}/users")
async def users(request: web.Request) -> web.Response:
    project, window, (rows, after) = await _page(request, request.app[STORE].users)
    return _json(UsersPage(**_range(project, window), rows=rows, next_cursor=_cursor_text(after)))


@routes.get("/api/v1/projects/{project}/events")
async def events(request: web.Request) -> web.Response:
    project, window, (rows, after) = await _page(request, request.app[STORE].events)
    return _json(EventsPage(**_range(project, window), rows=rows, next_cursor=_cursor_text(after)))


@routes.get("/api/v1/projects/{project}/users/{distinct_id}")
async def user(request: web.Request) -> web.Response:
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    parse_filters(request.query)  # rejects unknown parameters
    distinct_id = request.match_info["distinct_id"]
    found = await _read(request, request.app[STORE].user_timeline(project.id, distinct_id, window,
                                                                  parse_limit(request.query, default=50),
                                                                  _cursor(request)))
    if found is None:
        raise ApiError(404, f"no user {distinct_id!r} in project {project.id}")
    person, rows, after = found
    return _json(UserTimeline(**_range(project, window), user=person, rows=rows, next_cursor=_cursor_text(after)))


@routes.get("/api/v1/projects/{project}/properties")
async def properties(request: web.Request) -> web.Response:
    return await _rows(request, request.app[STORE].property_keys, default_limit=50)


@routes.get("/api/v1/projects/{project}/properties/{key}")
async def property_values(request: web.Request) -> web.Response:
    return await _rows(request, request.app[STORE].property_values, request.match_info["key"])


@routes.get("/api/v1/projects/{project}/traits")
async def traits(request: web.Request) -> web.Response:
    """Trait keys of the users active in the window under the filters (for trait.KEY filters)."""
    return await _rows(request, request.app[STORE].trait_keys, default_limit=50)


@routes.get("/api/v1/projects/{project}/traits/{key}")
async def trait_values(request: web.Request) -> web.Response:
    return await _rows(request, request.app[STORE].trait_values, request.match_info["key"])


GOALS_LIMIT = 100  # rows of the goals report by default: every goal a project may declare


@routes.get("/api/v1/projects/{project}/goals")
async def goals(request: web.Request) -> web.Response:
    """Custom events and declared page goals: visitors, events, conversion rate, revenue per currency."""
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    filters = parse_filters(request.query)
    visitors, rows = await _read(request, request.app[STORE].goals(
        project.id, window, filters, parse_limit(request.query, default=GOALS_LIMIT)))
    return _json(Goals(**_range(project, window), visitors=visitors, rows=rows))


@routes.get("/api/v1/projects/{project}/bots")
async def bots(request: web.Request) -> web.Response:
    """The crawlers every other number leaves out: a window and a limit only, a filter is a 400 rather than
    ignored."""
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    parse_filters(request.query)  # an unknown parameter is a 400 as elsewhere
    for key in request.query:
        if key not in OTHER_PARAMS:
            raise ApiError(400, f"{key}: the bots report takes a window and a limit, no filters", field=key)
    rows = await _read(request, request.app[STORE].bots(project.id, window, parse_limit(request.query)))
    return _json(RankedRows(**_range(project, window), rows=rows))
