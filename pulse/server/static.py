"""The page at / (links to the dashboard, the demo and the docs), the browser tracker at /static/sdk/tracker.js and the demo page at /demo/."""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

from aiohttp import web

from pulse.server.keys import KEYRING, SETTINGS

routes = web.RouteTableDef()
KEY_PLACEHOLDER = "__PULSE_INGEST_KEY__"

# what a browser pointed at the server finds: where to go next (plain HTML, nothing to run)
INDEX_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>pulse</title></head>
<body>
<h1>pulse</h1>
<p>This pulse server takes events and answers the read API under <code>/api/v1/</code>.</p>
<ul>
<li><a href="{dashboard}">Dashboard</a>{dashboard_note}</li>
<li><a href="/demo/">Demo page</a> (its events go to the demo project of <code>pulse serve --demo</code>)</li>
<li><a href="/health">Health</a>: queue, writer lag and last commit, as JSON</li>
<li><a href="/docs">Docs</a>: the README (Markdown, as plain text)</li>
</ul>
<p>The terminal dashboard runs on this host: <code>pulse tui --data-dir DIR</code>
(DIR: the server's data directory).</p>
</body>
</html>
"""


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    """Links to the web dashboard (the demo project's, when `pulse serve --demo` started the server), the demo
    page and the docs."""
    dashboard, note = "/dashboard/", ": with a project's read token (sk_…) or a share link (<code>pulse share create</code>)"
    demo_key = request.app[SETTINGS].demo_ingest_key
    grant = request.app[KEYRING].grant(demo_key) if demo_key else None
    if grant is not None:
        dashboard, note = f"/dashboard/{grant.project_id}", " of the demo project (its read token is printed at start)"
    page = INDEX_PAGE.format(dashboard=dashboard, dashboard_note=note)
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


@functools.cache
def asset(package: str, name: str) -> bytes:
    """A file of sdk/ or demo/: from the installed package, or beside the source tree in a checkout."""
    try:
        return importlib.resources.files(f"pulse.{package}").joinpath(name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[2] / package / name).read_bytes()


@routes.get("/static/sdk/tracker.js")
async def tracker(request: web.Request) -> web.Response:
    return web.Response(body=asset("sdk", "tracker.min.js"), content_type="application/javascript",
                        charset="utf-8", headers={"Cache-Control": "public, max-age=3600",
                                                  "Access-Control-Allow-Origin": "*"})


@routes.get("/demo")
async def demo_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/demo/")


@routes.get("/demo/")
@routes.get("/demo/{route:.+}")  # pages the demo reaches by history.pushState, on reload
async def demo(request: web.Request) -> web.Response:
    """The demo page, with the demo project's ingest key when `pulse serve --demo` started the server."""
    page = asset("demo", "index.html").decode().replace(KEY_PLACEHOLDER, request.app[SETTINGS].demo_ingest_key)
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


@functools.cache
def readme() -> bytes:
    """README.md: beside the source tree in a checkout, else the installed package's long description."""
    beside = Path(__file__).resolve().parents[2] / "README.md"
    if beside.is_file():
        return beside.read_bytes()
    from importlib.metadata import PackageNotFoundError, metadata
    try:
        return (metadata("pulse").get_payload() or "").encode()
    except PackageNotFoundError:
        return b"pulse: see README.md in its source tree\n"


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    return web.Response(body=readme(), content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "public, max-age=3600"})
