"""One middleware: JSON errors for everything, and CORS so browsers on any origin can send events."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from pulse.server.errors import ApiError, json_error
from pulse.server.keys import METRICS, SETTINGS
from pulse.storage.connection import QueryTimeout

log = logging.getLogger(__name__)
access_log = logging.getLogger("pulse.access")

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, X-API-Key, Authorization",
    "Access-Control-Max-Age": "86400",
}


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors for everything; CORS on the API so browsers on any origin can send events; counts and logs."""
    started = time.monotonic()
    api = request.path.startswith("/api/")
    if api and request.method == "OPTIONS":
        return web.Response(status=204, headers=CORS_HEADERS)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except QueryTimeout:
        limit = request.app[SETTINGS].query_timeout_s
        response = json_error(503, f"the query ran longer than {limit:g} s and was stopped; narrow the range or"
                                   " the filters", headers={"Retry-After": "10"})
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        response = json_error(413, f"request body too large: at most {limit} bytes", field="body")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_error(exc.status, exc.reason, headers={
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")
        })
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = json_error(500, "internal server error")
    if api and not response.prepared:
        response.headers["Access-Control-Allow-Origin"] = "*"
    request.app[METRICS].requests[response.status] += 1
    level = logging.ERROR if response.status >= 500 else logging.INFO if response.status >= 400 else logging.DEBUG
    if access_log.isEnabledFor(level):  # the path only: a query string may hold a key
        access_log.log(level, "request", extra={"fields": {
            "method": request.method, "path": request.path, "status": response.status,
            "ms": round((time.monotonic() - started) * 1000, 1), "ip": request.remote}})
    return response
