"""The browser tracker at /static/sdk/tracker.js and the demo page at /demo/."""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

from aiohttp import web

from pulse.server.keys import SETTINGS

routes = web.RouteTableDef()
KEY_PLACEHOLDER = "__PULSE_INGEST_KEY__"


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
