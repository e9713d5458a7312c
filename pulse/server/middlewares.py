"""One middleware: JSON errors for everything, and CORS so browsers on any origin can send events."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.typedefs import Handler

from pulse.server.errors import ApiError, json_error
from pulse.server.keys import METRICS, SETTINGS
from pulse.storage.model import NotAvailable, QueryTimeout, StoreUnavailable, WriterStalled

log = logging.getLogger(__name__)
access_log = logging.getLogger("pulse.access")

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, X-API-Key, Authorization, X-Umami-Cache",
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
    except WriterStalled as exc:  # a read would miss acknowledged events the writer still keeps
        response = json_error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
    except NotAvailable as exc:  # a question the configured store does not answer
        response = json_error(501, str(exc))
    except StoreUnavailable as exc:  # the store's database is down or not answering
        response = json_error(503, str(exc), headers={"Retry-After": "5"})
    except QueryTimeout:
        limit = request.app[SETTINGS].query_timeout_s
        response = json_error(503, f"the query ran longer than {limit:g} s and was stopped; narrow the range or"
                                   " the filters", headers={"Retry-After": "10"})
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        response = json_error(413, f"request body too large: at most {limit} bytes", field="body")
    except web.RequestPayloadError as exc:
        response = _unreadable_body(request, exc)
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


def _unreadable_body(request: web.Request, exc: web.RequestPayloadError) -> web.Response:
    """A body that is not what its framing or Content-Encoding says (gzip that is not gzip) is the client's
    fault: a 400. The rest of the stream cannot be parsed, so the connection closes after the answer, and
    the body is marked read so aiohttp does not drain it, meet the error again and log it as unhandled."""
    request.content.feed_eof()
    cause = exc.__cause__
    if isinstance(cause, ContentEncodingError):
        encoding = request.headers.get("Content-Encoding", "")
        message = f"body is not valid {encoding} (its Content-Encoding)"
    else:
        message = f"body could not be read: {cause.message if isinstance(cause, HttpProcessingError) else exc}"
    response = json_error(400, message, field="body")
    response.force_close()
    return response
