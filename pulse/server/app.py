"""create_app(settings) -> web.Application, and run() on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pulse.config import LOCK_FILENAME, SERVER_FILENAME, Settings
from pulse.enrich import load_agent_rules
from pulse.files import DATA_DIR_MODE, make_private
from pulse.server import analytics, dashboard, dropin, ingest, journeys, live, metrics, static
from pulse.server.auth import KeyRing
from pulse.server.geo import Countries, load_names
from pulse.server.keys import COUNTRIES, KEYRING, LIVE, METRICS, RATE_BY_IP, RATE_BY_KEY, SETTINGS, STORE, WARM_UP
from pulse.server.limits import TokenBuckets
from pulse.server.live import LiveHub
from pulse.server.metrics import Counters
from pulse.server.middlewares import api_middleware
from pulse.storage.base import open_store
from pulse.storage.model import StoreInUse

log = logging.getLogger("pulse.server")

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 while the server answers; a stalled or restarting writer shows in "writer", not in the status
    code, so a supervisor does not restart a server that drains its queue once the disk or writer recovers."""
    stats = request.app[STORE].ingest_stats()
    return web.json_response({
        "status": "ok",
        # ok; stalled: a request waited past PULSE_WRITE_TIMEOUT_S for its commit; restarting; stopping
        "writer": stats.state,
        "queued_events": stats.queued_events,
        "last_commit_at": stats.last_commit_at,
        "events_written": stats.events_written,
        "writer_lag_seconds": round(stats.lag_seconds, 3),
        # the readers' cache of recent days is filled (see PULSE_WARM_DAYS)
        "warmed_up": WARM_UP not in request.app or request.app[WARM_UP].done(),
    })


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    hub = app[LIVE]
    async with open_store(settings, on_commit=hub.publish, wants=hub.wants) as store:
        load_agent_rules()  # the live feed parses user agents on the event loop: not in its first message
        keyring = KeyRing(store, settings.operator_token)
        await keyring.reload()
        keyring.on_reload = lambda: hub.revoke(keyring.grants_read)  # a rotated token ends its live feeds
        app[STORE], app[KEYRING] = store, keyring
        tasks = [asyncio.create_task(keyring.watch(settings.catalog_poll_s), name="pulse-keyring-watch")]
        if settings.warm_days > 0:
            app[WARM_UP] = asyncio.create_task(store.warm_up(settings.warm_days), name="pulse-warm-up")
            tasks.append(app[WARM_UP])
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await keyring.close()


async def close_live_feeds(app: web.Application) -> None:
    await app[LIVE].close()


def create_app(settings: Settings) -> web.Application:
    """The application; GeoipUnavailable when the country database of `--geoip` cannot be read."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[api_middleware],
        handler_args={"max_line_size": 8190, "max_field_size": 8190, "max_headers": 64,
                      "keepalive_timeout": settings.keepalive_timeout_s},
    )
    app[SETTINGS] = settings
    app[METRICS] = Counters()
    app[COUNTRIES] = Countries(settings.geoip)
    load_names()
    app[RATE_BY_IP] = TokenBuckets(settings.rate_per_ip, settings.burst_per_ip)
    app[RATE_BY_KEY] = TokenBuckets(settings.rate_per_key, settings.burst_per_key)
    app[LIVE] = LiveHub(buffer_events=settings.live_buffer_events)
    app.on_shutdown.append(close_live_feeds)  # before aiohttp waits for running handlers
    app.on_shutdown.append(analytics.stop_reads)
    app.cleanup_ctx.append(storage_ctx)
    app.add_routes(routes)
    app.add_routes(ingest.routes)
    app.add_routes(analytics.routes)
    app.add_routes(journeys.routes)
    app.add_routes(live.routes)
    app.add_routes(static.routes)
    app.add_routes(dashboard.routes)
    app.add_routes(metrics.routes)
    app.add_routes(dropin.ROUTES)
    return app


class AlreadyRunning(Exception):
    pass


def local_url(settings: Settings) -> str:
    """Where a tool on this host reaches the server."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.host, settings.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


@contextlib.contextmanager
def serve_lock(settings: Settings):
    """One server per data directory and per store (`Store.lock`: for SQLite, per database file, however a
    symlink leads there); also records where it listens, for local tools. Held until the app has closed its
    store."""
    settings.data_dir.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    make_private(settings.data_dir, DATA_DIR_MODE)  # the operator may have made it, readable by all
    with contextlib.ExitStack() as held:
        handle = held.enter_context(open(settings.data_dir / LOCK_FILENAME, "a+"))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another pulse server is using {settings.data_dir}") from None
        try:
            held.enter_context(open_store(settings).lock())
        except StoreInUse as exc:
            raise AlreadyRunning(str(exc)) from None
        info_path = settings.data_dir / SERVER_FILENAME
        held.callback(info_path.unlink, missing_ok=True)
        # the operator token reads every project: the file is its owner's alone, like the database beside it
        fd = os.open(info_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as info:
            json.dump({"url": local_url(settings), "pid": os.getpid(), "token": settings.operator_token}, info)
        yield


class JsonLines(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and a record's `fields` if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ClientFaults(logging.Filter):
    """aiohttp logs a malformed request (the client's fault, already answered 400) as an error with a
    traceback: make it one info line, so hostile clients cannot flood the log with errors. A body that
    does not decode (gzip that is not gzip) and that no handler read is met when aiohttp drains it after
    the answer, and logged the same way."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, web.RequestPayloadError):
            error = error.__cause__
        if isinstance(error, HttpProcessingError) and 400 <= (error.code or 0) < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args, record.exc_info = f"malformed request: {error.message}".splitlines()[0], (), None
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines())
    handler.addFilter(ClientFaults())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run(settings: Settings, *, print_fn=print) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain the queue, commit and return."""
    import uvloop

    configure_logging(settings.log_level)
    if not settings.operator_token:
        settings = dataclasses.replace(settings, operator_token="sk_local_" + secrets.token_urlsafe(32))
    with serve_lock(settings):
        app = create_app(settings)
        gc.freeze()  # what start-up made lives for the whole run: keep it out of every collection
        # 128 requests in flight hold a few thousand young objects: at the default threshold (700) the
        # youngest generation was collected every ~150 requests, 4 us a request; they are freed by count
        gc.set_threshold(20_000, 20, 20)
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            loop=uvloop.new_event_loop(),
            access_log=None,
            shutdown_timeout=30.0,
            print=lambda _: print_fn(f"pulse listening on http://{settings.host}:{settings.port}"),
        )
