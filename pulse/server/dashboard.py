"""The web dashboard: one page (`/dashboard/{project}`), its stylesheet and its script, served as shipped.

The page reads the same read API as everyone (with a read token kept in the tab's session storage, or a share
link's token from the URL's fragment) and draws it itself, so nothing is built at install and no value from an
event is ever parsed as HTML. The content security policy lets the page load only its own files and talk only to
this server."""

from __future__ import annotations

import functools
import importlib.resources
import re

from aiohttp import web

from pulse.server.errors import ApiError

routes = web.RouteTableDef()

PAGE = "dashboard.html"
ASSETS = {"dashboard.css": "text/css", "dashboard.js": "application/javascript"}
# a Host header as a browser sends it: only then does it go into the policy (the live feed's WebSocket)
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


@functools.cache
def shipped(name: str) -> bytes:
    return importlib.resources.files("pulse").joinpath("web", name).read_bytes()


def policy(request: web.Request) -> str:
    """The content security policy: this server's own files, no inline script or style, no framing. `'self'`
    covers the WebSocket of the same host in current browsers; the host is named for those that do not."""
    connect = "'self'"
    if _HOST_RE.match(request.host):
        connect += f" ws://{request.host} wss://{request.host}"
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src {connect}; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _headers(request: web.Request, cache: str) -> dict[str, str]:
    return {"Content-Security-Policy": policy(request), "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": cache}


@routes.get("/dashboard")
async def dashboard_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard/")


@routes.get("/dashboard/")
@routes.get("/dashboard/{project}")
async def dashboard(request: web.Request) -> web.Response:
    """The page; it asks for a token itself, and without a project lists the ones the token sees."""
    raw = request.match_info.get("project", "")
    if raw and not raw.isdigit():
        raise ApiError(404, f"no project {raw!r}: projects are addressed by numeric id")
    return web.Response(body=shipped(PAGE), content_type="text/html", charset="utf-8",
                        headers=_headers(request, "no-cache"))


@routes.get("/static/web/{name}")
async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise ApiError(404, f"no file {name!r}")
    return web.Response(body=shipped(name), content_type=ASSETS[name], charset="utf-8",
                        headers=_headers(request, "no-cache"))
