"""Ingest in Umami's format: `POST /api/send` (one `{"type", "payload"}`) and `POST /api/batch` (an array of
them), as Umami's browser tracker and its Node client send them.

`payload.website` names the project by its site id (a UUID every project gets). A payload without `name` is a
page view; with one, a custom event with `data` as its properties. `identify` merges `data` into the person's
traits, the person being `id` when given (an `id` on any event is its distinct id) and pulse's anonymous
visitor otherwise.

The answer is Umami's: `{"cache", "sessionId", "visitId"}`, and `{"beep": "boop"}` to a crawler, whose page
views and events are recorded as a bot's (left out of every number but the bots report; its `identify` is not). The cache is a token this server signs (HMAC with
a key made when the server starts, so a token from before a restart is simply not recognised); the browser
tracker sends it back in `x-umami-cache`, and a visit id in a token that verifies is kept for up to 30 minutes
after the token was made, as Umami keeps it. Nothing in a token that does not verify is used. Umami's session
and visit ids are answered for its clients; pulse keeps its own visitors and sessions.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from pulse.enrich import parse_agent
from pulse.protocol import (
    MAX_AGENT, MAX_EVENTS_PER_BATCH, MAX_ID, MAX_PROPERTIES, MAX_PROPERTY_KEY, MAX_PROPERTY_VALUE, MAX_TIME_MS,
    MAX_URL, IngestEvent,
)
from pulse.server.errors import ApiError
from pulse.server.ingest import admit, fitting_language, fitting_width, read_body, store_events, visitor_agent
from pulse.server.keys import KEYRING, METRICS
from pulse.storage.model import DAY_MS, HOUR_MS, PAGE_VIEW, Project

routes = web.RouteTableDef()

IDENTIFY = "$identify"
CACHE_HEADER = "x-umami-cache"
VISIT_IDLE_S = 1800  # Umami keeps a cached visit id this long after its token was made
MAX_EVENT_NAME = 50  # Umami's limits
MAX_HOSTNAME = 100
# the key that signs cache tokens: made at start, never stored (a token from an earlier run does not verify)
_CACHE_KEY = secrets.token_bytes(32)
BEEP = {"beep": "boop"}  # Umami's answer to a crawler


class BadRequest(Exception):
    """An item Umami would refuse: answered 400 in Umami's error shape."""

    def __init__(self, message: str = "Bad request") -> None:
        super().__init__(message)
        self.message = message


def error_body(status: int, message: str) -> dict:
    code = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
            429: "too-many-requests"}.get(status, "server-error")
    return {"error": {"message": message, "code": code, "status": status}}


class Token(msgspec.Struct, array_like=True):
    """What a cache token says: the site, Umami's session and visit ids, when it was made (epoch seconds)."""

    website: str
    session_id: str
    visit_id: str
    iat: int


_token_decoder = msgspec.json.Decoder(Token)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signature(payload: str) -> str:
    return _b64(hmac.digest(_CACHE_KEY, payload.encode(), "sha256"))


def sign(token: Token) -> str:
    payload = _b64(msgspec.json.encode(token))
    return f"{payload}.{_signature(payload)}"


def verify(cache: str | None) -> Token | None:
    """The token's content if this server signed it, else None (a forged, altered or stale token is ignored)."""
    if not cache or not cache.isascii() or cache.count(".") != 1:  # a token this server made is ASCII
        return None
    payload, signature = cache.split(".")
    if not hmac.compare_digest(signature, _signature(payload)):
        return None
    try:
        return _token_decoder.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, msgspec.DecodeError):
        return None


def _uuid(*parts: str) -> str:
    """The same UUID for the same parts while the server runs, keyed like the cache (so not to be worked back
    to the visitor's IP and agent)."""
    digest = hmac.digest(_CACHE_KEY, "\x00".join(parts).encode(), "sha256")
    return str(uuid.UUID(bytes=digest[:16], version=4))


@dataclass(slots=True)
class Item:
    """One decoded `{"type", "payload"}`: its project, the pulse event to record (None: answered, not
    recorded), and what Umami's session id is made of."""

    project: Project
    event: IngestEvent | None
    bot: bool
    distinct_id: str | None
    ip: str | None  # the payload's, a backend's visitor's; else the request's, once admitted
    agent: str


def _text(payload: dict, key: str, limit: int) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest()
    return value or None


def _flatten(data: dict, into: dict, prefix: str = "") -> None:
    """Umami's event data as pulse's flat properties: nested objects by dotted keys (as Umami stores them),
    lists as JSON text; keys past pulse's count or length are not kept, long strings are cut to its limit."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, into, name + ".")
            continue
        if len(into) == MAX_PROPERTIES:
            return
        if not name or len(name) > MAX_PROPERTY_KEY:
            continue
        if isinstance(value, list):
            value = msgspec.json.encode(value).decode()
        into[name] = value[:MAX_PROPERTY_VALUE] if isinstance(value, str) else value


def _page_url(payload: dict) -> str | None:
    """The page's URL: `url` as sent when absolute, else joined to `hostname` (Umami's trackers may send the
    path and the host apart); a path alone when there is no hostname."""
    url = _text(payload, "url", MAX_URL)
    hostname = _text(payload, "hostname", MAX_HOSTNAME)
    if url is None:
        return f"https://{hostname}/" if hostname else None
    if urlsplit(url).scheme or not hostname:
        return url
    return f"https://{hostname}{url if url.startswith('/') else '/' + url}"[:MAX_URL]


def decode(request: web.Request, item: object) -> Item:
    """One `{"type", "payload"}` as the pulse event to record; BadRequest where Umami answers 400."""
    if not isinstance(item, dict) or not isinstance(item.get("payload"), dict):
        raise BadRequest()
    kind, payload = item.get("type"), item["payload"]
    if kind not in ("event", "identify", "performance"):
        raise BadRequest()
    website = payload.get("website")
    try:
        site_id = str(uuid.UUID(website)) if isinstance(website, str) else None
    except ValueError:
        site_id = None
    if site_id is None:
        raise BadRequest()
    project = request.app[KEYRING].by_site_id(site_id)
    if project is None:
        raise BadRequest("Website not found.")
    agent = _text(payload, "userAgent", MAX_AGENT)
    ip = _text(payload, "ip", 45)
    distinct_id = _text(payload, "id", MAX_ID)
    name = _text(payload, "name", MAX_EVENT_NAME)
    referrer = _text(payload, "referrer", MAX_URL)
    page_url = _page_url(payload)
    for key, limit in (("title", MAX_URL), ("tag", MAX_EVENT_NAME)):
        _text(payload, key, limit)  # checked as Umami checks them; not recorded
    screen = _text(payload, "screen", 11)  # "1920x1080": the width first
    language = _text(payload, "language", 35)
    timestamp = payload.get("timestamp")
    if timestamp is not None and (not isinstance(timestamp, int) or isinstance(timestamp, bool)
                                  or not 0 <= timestamp * 1000 <= MAX_TIME_MS):
        raise BadRequest()
    data = payload.get("data")
    if data is not None and not isinstance(data, dict):
        raise BadRequest()
    visitor = agent if agent is not None else visitor_agent(request)
    found = Item(project, None, parse_agent(visitor).is_bot, distinct_id, ip, visitor)
    if kind == "performance" or (found.bot and kind == "identify"):
        return found  # web vitals are not kept, nor the traits a crawler claims
    properties: dict = {}
    if data:
        _flatten(data, properties)
    width = screen.partition("x")[0] if screen is not None else ""
    fields = dict(distinct_id=distinct_id, user_agent=agent, ip=ip,
                  timestamp=None if timestamp is None else timestamp * 1000, language=fitting_language(language),
                  screen_width=fitting_width(int(width)) if width.isascii() and width.isdigit() else None)
    if kind == "identify":
        found.event = IngestEvent(event=IDENTIFY, traits=properties or None, **fields)
    else:
        found.event = IngestEvent(event=name or PAGE_VIEW, page_url=page_url, referrer=referrer,
                                  properties=properties or None, **fields)
    return found


def answer(request: web.Request, item: Item, now_s: int) -> dict:
    """Umami's answer to a recorded item: a newly signed cache, the session and the visit."""
    if item.bot:
        return BEEP
    site_id = item.project.site_id or ""
    if item.distinct_id is not None:  # Umami's session of an identified visitor is theirs on any device
        session_id = _uuid("session", site_id, item.distinct_id)
    else:
        session_id = _uuid("session", site_id, item.ip or "", item.agent, str(now_s * 1000 // DAY_MS))
    cached = verify(request.headers.get(CACHE_HEADER))
    if (cached is not None and cached.website == site_id and cached.session_id == session_id
            and 0 <= now_s - cached.iat <= VISIT_IDLE_S):
        visit_id, iat = cached.visit_id, cached.iat
    else:
        visit_id, iat = _uuid("visit", session_id, str(now_s * 1000 // HOUR_MS)), now_s
    return {"cache": sign(Token(site_id, session_id, visit_id, iat)), "sessionId": session_id, "visitId": visit_id}


async def _record(request: web.Request, items: list[Item], received: int) -> None:
    """Admit each project once (origin, rate), then store its events and wait until they are durable."""
    by_project: dict[int, list[Item]] = {}
    for item in items:
        by_project.setdefault(item.project.id, []).append(item)
    stored = []
    for group in by_project.values():
        project = group[0].project
        ip = admit(request, project)
        for item in group:
            item.ip = item.ip or ip
        events = [item.event for item in group if item.event is not None]
        if events:
            stored.append(store_events(request, project, ip, visitor_agent(request), events, None, received))
    # every project's jobs are awaited, so none of their outcomes goes unseen
    for outcome in await asyncio.gather(*stored, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


async def _json(request: web.Request) -> object:
    body = await read_body(request)
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise BadRequest() from None


def _refused(request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
             ) -> web.Response:
    request.app[METRICS].ingest_rejected[status] += 1
    return web.json_response(error_body(status, message), status=status, headers=headers)


@routes.post("/api/send")
async def send(request: web.Request) -> web.Response:
    try:
        received = time.time_ns() // 1_000_000
        item = decode(request, await _json(request))
        await _record(request, [item], received)
        return web.json_response(answer(request, item, received // 1000))
    except BadRequest as exc:
        return _refused(request, 400, exc.message)
    except ApiError as exc:  # refused by pulse's own checks (origin, rate, storage): in Umami's shape
        return _refused(request, exc.status, exc.message, exc.headers)


@routes.post("/api/batch")
async def batch(request: web.Request) -> web.Response:
    """Each item answered as `/api/send` would answer it; the recorded ones are stored together. Umami's
    answer: how many were processed, the errors' answers by index, and the first item's cache."""
    try:
        received = time.time_ns() // 1_000_000
        items = await _json(request)
        if not isinstance(items, list) or len(items) > MAX_EVENTS_PER_BATCH:
            raise BadRequest()
        decoded: list[Item] = []
        details = []
        for index, raw in enumerate(items):
            try:
                decoded.append(decode(request, raw))
            except BadRequest as exc:
                details.append({"index": index, "response": error_body(400, exc.message)})
        await _record(request, decoded, received)
    except BadRequest as exc:
        return _refused(request, 400, exc.message)
    except ApiError as exc:
        return _refused(request, exc.status, exc.message, exc.headers)
    answers = [answer(request, item, received // 1000) for item in decoded]
    cache = next((found["cache"] for found in answers if "cache" in found), None)
    return web.json_response({"size": len(items), "processed": len(decoded), "errors": len(details),
                              "details": details, "cache": cache})
