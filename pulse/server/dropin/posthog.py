"""Ingest in PostHog's format: posthog-js, posthog-python and PostHog's other SDKs send to pulse with only
their host changed.

The capture paths (`/e`, `/i/v0/e`, `/capture`, `/batch`, `/track`, `/engage`) take one event, an array of
events or a `{"api_key", "batch", "sent_at"}` batch, as JSON, base64, form `data=` or gzip (which current
posthog-js sends as `text/plain` with no hint but its magic bytes). Each event becomes a pulse event:
`$pageview` with a URL is pulse's `page_view`, `$identify` and `$create_alias` link ids as pulse's identify
does, `$set`/`$set_once` are traits. The project's ingest key is PostHog's token. posthog-js also asks for
its remote config and feature flags at start: they are answered with everything off and no flags, so it
loads no further scripts.

These paths are outside /api/, so they answer CORS themselves (the browser SDK sends with credentials, so the
Origin is mirrored rather than `*`), on every answer, errors included. Errors have the shape of PostHog's
own JSON errors; a success is exactly 200 (posthog-js retries anything else), 204 for `?beacon=1`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from urllib.parse import parse_qs
from uuid import UUID

import msgspec
from aiohttp import web

from pulse.protocol import (
    MAX_AGENT, MAX_ID, MAX_NAME, MAX_PROPERTIES, MAX_PROPERTY_KEY, MAX_PROPERTY_VALUE, MAX_TIME_MS, MAX_URL,
    MIN_TIME_MS, IngestEvent,
)
from pulse.server.errors import ApiError
from pulse.server.ingest import admit, fitting_language, fitting_width, read_body, store_events, visitor_agent
from pulse.server.keys import KEYRING, METRICS, SETTINGS
from pulse.storage.model import PAGE_VIEW

routes = web.RouteTableDef()

CAPTURE_PATHS = ("/e", "/i/v0/e", "/capture", "/batch", "/track", "/engage")
_GZIP_MAGIC = b"\x1f\x8b"
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
_FORM = "application/x-www-form-urlencoded"
# a `sent_at` in milliseconds from the query counts only after 2020, as PostHog reads it (`_` is often a
# cache-buster counter, not a time)
_QUERY_SENT_AT_AFTER_MS = 1_577_836_800_000
_GZIP_HINTS = frozenset({"gzip", "gzip-js"})
_LZ_HINTS = frozenset({"lz64", "lz-string"})
_BASE64_HINTS = frozenset({"base64", "b64"})
# event fields pulse keeps in their own columns (or, for the key, never): not stored again as properties
_MAPPED = frozenset({
    "token", "distinct_id", "$current_url", "$referrer", "$session_id", "$raw_user_agent", "$ip",
    "$set", "$set_once", "$anon_distinct_id", "$browser_language", "$locale", "$screen_width",
})
_DIRECT = "$direct"  # posthog-js's referrer when there is none
_ERROR_TYPES = {400: "validation_error", 401: "authentication_error", 403: "authentication_error",
                408: "validation_error", 413: "validation_error", 429: "throttled_error"}
_ERROR_CODES = {408: "timeout", 413: "payload_too_large", 429: "rate_limited"}
_OK = b'{"status":1}'

# what posthog-js reads from its remote config: everything off, gzip accepted, no feature flags, autocapture
# as the client's own option says; no `analytics` key, so events keep going to /e/
_REMOTE_CONFIG = {
    "supportedCompression": ["gzip", "gzip-js"], "hasFeatureFlags": False, "autocapture_opt_out": False,
    "captureDeadClicks": False, "capturePerformance": False, "autocaptureExceptions": False,
    "sessionRecording": False, "surveys": False, "heatmaps": False, "productTours": False,
    "conversations": False, "logs": False, "siteApps": [], "toolbarParams": {}, "isAuthenticated": False,
    "defaultIdentifiedOnly": True, "elementsChainAsString": True,
}
_NO_FLAGS = {"flags": {}, "errorsWhileComputingFlags": False}

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class _Drop:
    """A property value that does not fit pulse's limits."""


_DROPPED = _Drop()


def _cors(request: web.Request) -> dict[str, str]:
    origin = request.headers.get("Origin")
    allowed = ["Content-Type"]
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        allowed.append(requested)
    headers = {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": ", ".join(allowed),
        "Access-Control-Max-Age": "86400",
        "Vary": "Origin",
    }
    if origin:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
    else:
        headers["Access-Control-Allow-Origin"] = "*"
    return headers


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": _ERROR_TYPES.get(status, "server_error"), "code": code, "detail": detail, "attr": None}
    return web.Response(status=status, body=_encode(body), content_type="application/json", headers=headers)


class PostHogError(ApiError):
    """An error with PostHog's code for it (`invalid_payload`, `missing_api_key`, …)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(status, detail)
        self.code = code


def _invalid(detail: str) -> PostHogError:
    return PostHogError(400, "invalid_payload", detail)


def _posthog_answers(handler: Callable[[web.Request], Awaitable[web.Response]]):
    """Errors in PostHog's JSON shape, and CORS on every answer."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.Response:
        try:
            response = await handler(request)
        except ApiError as exc:
            request.app[METRICS].ingest_rejected[exc.status] += 1
            code = getattr(exc, "code", None) or _ERROR_CODES.get(exc.status) or (
                "invalid_api_key" if exc.status == 401 else "permission_denied" if exc.status == 403 else
                "invalid_payload" if exc.status < 500 else "unavailable")
            response = _error(exc.status, code, exc.message, exc.headers)
        except web.HTTPRequestEntityTooLarge:
            request.app[METRICS].ingest_rejected[413] += 1
            limit = request.app[SETTINGS].max_body_bytes
            response = _error(413, "payload_too_large", f"request body too large: at most {limit} bytes")
        except web.RequestPayloadError as exc:
            # the body is not what its framing or Content-Encoding says: the rest of the stream cannot be
            # parsed, so the connection closes after the answer (and aiohttp does not drain it again)
            request.content.feed_eof()
            request.app[METRICS].ingest_rejected[400] += 1
            response = _error(400, "invalid_payload", f"body could not be read: {exc}")
            response.force_close()
        response.headers.update(_cors(request))
        return response

    return answer


async def _preflight(request: web.Request) -> web.Response:
    return web.Response(status=200, body=b'{"status":"Ok"}', content_type="application/json",
                        headers=_cors(request))


# -- decoding ------------------------------------------------------------------------------------------


def _gunzip(data: bytes, limit: int) -> bytes:
    """Inflate at most `limit` bytes: a small body that inflates to more is refused, not held in memory."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise _invalid(f"body is not valid gzip: {exc}") from None
    if inflater.unconsumed_tail:
        raise PostHogError(413, "payload_too_large", f"body too large once inflated: at most {limit} bytes")
    if not inflater.eof:
        raise _invalid("body is not valid gzip: it ends early")
    return out


def _looks_base64(data: bytes) -> bool:
    return len(data) % 4 == 0 and _BASE64.fullmatch(data) is not None


def _unbase64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("body is not valid base64") from None


async def _payload(request: web.Request) -> bytes:
    """The request's JSON text, whatever wrapping it came in."""
    limit = request.app[SETTINGS].max_body_bytes
    hint = request.query.get("compression", "").lower()
    data = request.query.get("data", "").encode()
    if not data:
        data = await read_body(request)
        if request.content_type == _FORM and data:
            try:
                form = parse_qs(data.decode(), keep_blank_values=True)
            except UnicodeDecodeError:
                raise _invalid("form body is not valid UTF-8") from None
            data = form.get("data", [""])[0].encode()
            hint = hint or form.get("compression", [""])[0].lower()
        elif not hint:
            hint = request.headers.get("Content-Encoding", "").lower()
    data = data.strip()
    if not data:
        raise _invalid("empty payload: send events in the body or the data query parameter")
    if hint in _LZ_HINTS:
        raise _invalid("lz64 (lz-string) compression is not supported: send gzip-js, base64 or plain JSON")
    if hint in _BASE64_HINTS or data[:1] not in b"{[" and _looks_base64(data.replace(b" ", b"+")):
        # a form's `+` arrives as a space
        data = _unbase64(data.replace(b" ", b"+"))
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data, limit)
    elif hint in _GZIP_HINTS and request.headers.get("Content-Encoding", "").lower() != "gzip":
        # (a `Content-Encoding: gzip` body arrives here inflated already)
        raise _invalid("body is not valid gzip, as its compression says")
    stripped = data.strip()
    if stripped[:1] not in b"{[" and _looks_base64(stripped):  # base64 inside the compression, as old clients send
        data = _unbase64(stripped)
    return data


def _parse(data: bytes) -> object:
    try:
        return _decode(data)
    except msgspec.DecodeError as exc:
        raise _invalid(f"body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise _invalid("body is not valid UTF-8") from None


# -- the key -------------------------------------------------------------------------------------------


def _token_of(event: dict) -> object:
    for name in ("api_key", "token", "$token"):
        if event.get(name):
            return event[name]
    properties = event.get("properties")
    return properties.get("token") if isinstance(properties, dict) else None


def _secret(request: web.Request, body: object, events: list[dict]) -> str:
    """The one key the request carries: the batch's, or its events' (401 for none, or several)."""
    found: set[str] = set()
    candidates = [request.query.get("token"), request.query.get("api_key")]
    if isinstance(body, dict) and "batch" in body:
        candidates += [body.get("api_key"), body.get("token")]
    else:
        candidates += [_token_of(ev) for ev in events]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            found.add(candidate.strip())
    if not found:
        raise PostHogError(401, "missing_api_key", "API key not provided: send the project's ingest key (pk_…)"
                                                   " as the token")
    if len(found) > 1:
        raise PostHogError(401, "invalid_api_key", "several different API keys in one request")
    return found.pop()


# -- events --------------------------------------------------------------------------------------------


def _events(body: object) -> tuple[list[dict], object]:
    """The events of a body and its `sent_at`."""
    sent_at = None
    if isinstance(body, list):
        events = body
    elif isinstance(body, dict) and "batch" in body:
        events, sent_at = body["batch"], body.get("sent_at")
        if not isinstance(events, list):
            raise _invalid("batch: expected an array of events")
    elif isinstance(body, dict):
        events = [body]
    else:
        raise _invalid("expected an event, an array of events or a batch")
    if not events:
        raise _invalid("empty batch: no events")
    for index, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise _invalid(f"batch[{index}]: expected an event object")
    return events, sent_at


def _time_ms(value: object, what: str) -> int:
    if not isinstance(value, str):
        raise _invalid(f"{what}: expected an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _invalid(f"{what}: not an ISO 8601 time: {value[:64]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _sent_at_ms(request: web.Request, sent_at: object) -> int | None:
    if sent_at is not None:
        return _time_ms(sent_at, "sent_at")
    for name in ("sent_at", "_"):
        value = request.query.get(name, "")
        if value.isdigit() and int(value) > _QUERY_SENT_AT_AFTER_MS:
            return int(value)
    return None


def _event_ms(ev: dict, index: int, sent_at_ms: int | None, received_ms: int) -> int | None:
    """When the event happened, as PostHog works it out: `timestamp` moved by the client's clock skew (the
    time between `sent_at` and receipt), or `offset` ms before receipt; None is the time of receipt."""
    stamp = ev.get("timestamp")
    offset = ev.get("offset")
    if stamp is not None:
        ts = _time_ms(stamp, f"batch[{index}].timestamp")
        if sent_at_ms is not None:
            ts += received_ms - sent_at_ms
    elif isinstance(offset, (int, float)) and not isinstance(offset, bool):
        ts = received_ms - int(offset)
    else:
        return None
    return ts if MIN_TIME_MS <= ts <= MAX_TIME_MS else None


def _text_id(value: object) -> str | None:
    """An id as PostHog takes it: a string as it is, anything else as its JSON text; cut to pulse's length."""
    if value is None:
        return None
    text = value if isinstance(value, str) else _encode(value).decode()
    return text[:MAX_ID] or None


def _value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value[:MAX_PROPERTY_VALUE]
    text = _encode(value).decode()  # a list or an object: kept as its JSON text when that fits
    return text if len(text) <= MAX_PROPERTY_VALUE else _DROPPED


def _fit(properties: dict, skip: frozenset[str] = frozenset()) -> dict | None:
    """Properties within pulse's limits: the client's own first, then PostHog's `$` ones, as many as fit;
    a key that is too long is dropped, a text value cut."""
    kept: dict = {}
    ordered = [k for k in properties if not k.startswith("$")] + [k for k in properties if k.startswith("$")]
    for key in ordered:
        if key in skip or not key or len(key) > MAX_PROPERTY_KEY:
            continue
        value = _value(properties[key])
        if value is _DROPPED:
            continue
        if len(kept) == MAX_PROPERTIES:
            break
        kept[key] = value
    return kept or None


def _object(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _url(value: object) -> str | None:
    return value[:MAX_URL] if isinstance(value, str) and value else None


def _to_pulse(ev: dict, index: int, engage: bool, sent_at_ms: int | None, received_ms: int) -> IngestEvent:
    properties = _object(ev.get("properties"))
    name = ev.get("event")
    if engage and not name:  # the old people API: an event without a name sets the person's properties
        name = "$identify"
    if not isinstance(name, str) or not name:
        raise _invalid(f"batch[{index}].event: an event needs a name")
    if len(name) > MAX_NAME:
        raise _invalid(f"batch[{index}].event: longer than {MAX_NAME} characters")
    distinct_id = _text_id(ev.get("distinct_id", ev.get("$distinct_id")))
    if distinct_id is None:
        distinct_id = _text_id(properties.get("distinct_id"))
    if distinct_id is None:
        raise PostHogError(400, "missing_distinct_id", f"batch[{index}]: the event has no distinct_id")
    uuid = ev.get("uuid") or None
    if uuid is not None:
        try:
            uuid = UUID(uuid) if isinstance(uuid, str) else None
        except ValueError:
            uuid = None
        if uuid is None:
            raise _invalid(f"batch[{index}].uuid: not a UUID")
    page_url = _url(properties.get("$current_url"))
    if name == "$pageview" and page_url is not None:
        name = PAGE_VIEW
    referrer = properties.get("$referrer")
    anon_id = None
    if name == "$identify":
        anon_id = _text_id(properties.get("$anon_distinct_id"))
    elif name == "$create_alias":
        # the alias is the id the person goes by from now on; the event's id is linked to it
        alias = _text_id(properties.get("alias"))
        if alias is not None:
            distinct_id, anon_id = alias, distinct_id
    # set-once is merged as set (pulse keeps no "already set" per trait); $set wins over it, top level over
    # properties
    traits = {**_object(properties.get("$set_once")), **_object(ev.get("$set_once")),
              **_object(properties.get("$set")), **_object(ev.get("$set"))}
    agent = properties.get("$raw_user_agent")
    ip = properties.get("$ip")
    return IngestEvent(
        event=name,
        uuid=uuid,
        distinct_id=distinct_id,
        session_id=_text_id(properties.get("$session_id")),
        page_url=page_url,
        referrer=None if referrer == _DIRECT else _url(referrer),
        properties=_fit(properties, _MAPPED),
        traits=_fit(traits) if traits else None,
        anon_id=anon_id if anon_id != distinct_id else None,
        timestamp=_event_ms(ev, index, sent_at_ms, received_ms),
        user_agent=agent[:MAX_AGENT] if isinstance(agent, str) else None,
        ip=ip if isinstance(ip, str) and ip else None,
        # posthog-js: navigator.language and screen.width; the mobile SDKs: the device's locale
        language=fitting_language(properties.get("$browser_language")) or fitting_language(properties.get("$locale")),
        screen_width=fitting_width(properties.get("$screen_width")),
    )


@_posthog_answers
async def capture(request: web.Request) -> web.Response:
    body = _parse(await _payload(request))
    received = time.time_ns() // 1_000_000
    events, sent_at = _events(body)
    project = request.app[KEYRING].ingest_project(_secret(request, body, events))
    ip = admit(request, project)
    sent_at_ms = _sent_at_ms(request, sent_at)
    engage = request.path.rstrip("/") == "/engage"
    mapped = [_to_pulse(ev, index, engage, sent_at_ms, received) for index, ev in enumerate(events)]
    # each event's time is worked out above (a batch may mix offsets and timestamps): no skew on top
    await store_events(request, project, ip, visitor_agent(request), mapped, None, received)
    if request.query.get("beacon") == "1":
        return web.Response(status=204)
    return web.Response(status=200, body=_OK, content_type="application/json")


# -- feature flags and remote config -------------------------------------------------------------------


def _json(value: object) -> web.Response:
    return web.Response(status=200, body=_encode(value), content_type="application/json")


@_posthog_answers
async def flags(request: web.Request) -> web.Response:
    """No feature flags. Clients from before the remote config took their config from here (`config=true`)."""
    if request.query.get("config") == "true":
        return _json({**_REMOTE_CONFIG, **_NO_FLAGS})
    return _json(_NO_FLAGS)


@_posthog_answers
async def decide(request: web.Request) -> web.Response:
    """No feature flags, in the shape each version of the old endpoint had, with the config it carried."""
    try:
        version = int(request.query.get("v", "1"))
    except ValueError:
        version = 1
    if version >= 4:
        found: dict = _NO_FLAGS
    elif version == 3:
        found = {"featureFlags": {}, "featureFlagPayloads": {}, "errorsWhileComputingFlags": False}
    elif version == 2:
        found = {"featureFlags": {}}
    else:
        found = {"featureFlags": []}
    return _json({**_REMOTE_CONFIG, "config": {"enable_collect_everything": True}, **found})


@_posthog_answers
async def remote_config(request: web.Request) -> web.Response:
    return _json({"token": request.match_info["key"], **_REMOTE_CONFIG})


@_posthog_answers
async def remote_config_js(request: web.Request) -> web.Response:
    key = _encode(request.match_info["key"]).decode()
    config = _encode({"token": request.match_info["key"], **_REMOTE_CONFIG}).decode()
    script = (f"(function(){{window._POSTHOG_REMOTE_CONFIG=window._POSTHOG_REMOTE_CONFIG||{{}};"
              f"window._POSTHOG_REMOTE_CONFIG[{key}]={{config:{config},siteApps:[]}}}}());")
    return web.Response(status=200, text=script, content_type="application/javascript",
                        headers={"Cache-Control": "public, max-age=300"})


def _route(path: str, handler, methods: tuple[str, ...] = ("GET", "POST")) -> None:
    for variant in (path, path + "/"):
        for method in methods:
            routes.route(method, variant)(handler)
        routes.route("OPTIONS", variant)(_preflight)


for _path in CAPTURE_PATHS:
    _route(_path, capture)
_route("/flags", flags)
_route("/decide", decide)
_route("/array/{key}/config", remote_config, ("GET",))
_route("/array/{key}/config.js", remote_config_js, ("GET",))
