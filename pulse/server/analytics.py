"""The read API, under /api/v1/projects/{project}/…, for read tokens."""

from __future__ import annotations

from aiohttp import web

from pulse.server.errors import ApiError
from pulse.server.keys import KEYRING, READER
from pulse.server.timerange import parse_window
from pulse.storage import queries
from pulse.storage.projects import Project
from pulse.storage.queries import Window

routes = web.RouteTableDef()


def _project(request: web.Request) -> Project:
    raw = request.match_info["project"]
    if not raw.isdigit():
        raise ApiError(404, f"no project {raw!r}: projects are addressed by numeric id")
    return request.app[KEYRING].read(request, int(raw))


@routes.get("/api/v1/projects/{project}/overview")
async def overview(request: web.Request) -> web.Response:
    project = _project(request)
    window = parse_window(request.query, project.timezone)
    previous = Window(window.start - (window.end - window.start), window.start)
    reader = request.app[READER]
    current = await reader.run(queries.overview, project.id, window)
    before = await reader.run(queries.overview, project.id, previous)
    return web.json_response({
        "project": project.id,
        "from": window.start,
        "to": window.end,
        **current,
        "previous": before,
    })
