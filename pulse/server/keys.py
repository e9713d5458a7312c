"""Every web.AppKey of the application, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from pulse.config import Settings

if TYPE_CHECKING:
    from pulse.server.auth import KeyRing
    from pulse.server.geo import Countries
    from pulse.server.limits import TokenBuckets
    from pulse.server.live import LiveHub
    from pulse.server.metrics import Counters
    from pulse.storage.base import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", "Store")
KEYRING = web.AppKey("keyring", "KeyRing")
COUNTRIES = web.AppKey("countries", "Countries")
LIVE = web.AppKey("live", "LiveHub")
METRICS = web.AppKey("metrics", "Counters")
RATE_BY_KEY = web.AppKey("rate_by_key", "TokenBuckets")
RATE_BY_IP = web.AppKey("rate_by_ip", "TokenBuckets")
WARM_UP = web.AppKey("warm_up", "asyncio.Task")
