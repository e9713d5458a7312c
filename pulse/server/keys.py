"""Every web.AppKey of the application, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from pulse.config import Settings

if TYPE_CHECKING:
    from pulse.server.auth import KeyRing
    from pulse.server.live import LiveHub
    from pulse.storage.reader import Reader
    from pulse.storage.writer import EventWriter

SETTINGS = web.AppKey("settings", Settings)
WRITER = web.AppKey("writer", "EventWriter")
READER = web.AppKey("reader", "Reader")
KEYRING = web.AppKey("keyring", "KeyRing")
LIVE = web.AppKey("live", "LiveHub")
