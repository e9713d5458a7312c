"""Ingest in Plausible's format."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
