"""Ingest in Plausible's format: `POST /api/event`, as Plausible's script, its npm tracker and its Events API
send it.

The body is one JSON event, whatever its Content-Type (the tracker sends `text/plain`, so a browser sends it
without a preflight), with short or long keys. `d` names the site by its domain, which is a project's
`domain` here; a comma-separated list records the event once in each project. The answer is Plausible's:
`202 ok`; an unknown domain's event is not recorded, and a crawler's is recorded as a bot's (left out of every
number but the bots report): both are answered `202 ok` with `x-plausible-dropped: N`, as Plausible answers
them; a body that cannot be an event is a 400 `{"errors": {field: [messages]}}`.

Plausible sends no visitor or session id: the visitor is pulse's anonymous one, the daily-salted hash of IP
and user agent. `engagement` events (scroll depth and time on page) are answered and not recorded.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from pulse.enrich import parse_agent
from pulse.protocol import MAX_NAME, MAX_PROPERTY_KEY, MAX_PROPERTY_VALUE, MAX_URL, IngestEvent
from pulse.server.errors import ApiError
from pulse.server.ingest import admit, fitting_width, read_body, store_events, visitor_agent
from pulse.server.keys import KEYRING, METRICS
from pulse.storage.model import PAGE_VIEW, Project

routes = web.RouteTableDef()

PAGEVIEW = "pageview"
ENGAGEMENT = "engagement"
MAX_EVENT_NAME = 120  # Plausible's limit
MAX_PROPS = 30  # Plausible's: more are not kept
DROPPED = "x-plausible-dropped"


class BadEvent(Exception):
    """A body that is not a Plausible event: answered 400 with Plausible's `{"errors": {field: [message]}}`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _errors(status: int, field: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"errors": {field: [message]}}, status=status, headers=headers)


def _accepted(dropped: int) -> web.Response:
    return web.Response(status=202, text="ok", headers={DROPPED: str(dropped)} if dropped else None)


def _first(body: dict, *keys: str):
    """The value of the first key present (Plausible takes `n` before `name`, and so on)."""
    for key in keys:
        if key in body:
            return body[key]
    return None


def _props(raw) -> dict[str, str | int | float | bool | None] | None:
    """Plausible's `p`/`props` (an object, or an object as a JSON string) as pulse's flat properties: list and
    object values are left out, as Plausible leaves them out; keys past pulse's length and props past
    Plausible's count are not kept, long strings are cut to pulse's limit."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise BadEvent("props", "is invalid") from None
    if not isinstance(raw, dict):
        raise BadEvent("props", "is invalid")
    props: dict[str, str | int | float | bool | None] = {}
    for key, value in raw.items():
        if isinstance(value, (list, dict)) or not key or len(key) > MAX_PROPERTY_KEY:
            continue
        props[key] = value[:MAX_PROPERTY_VALUE] if isinstance(value, str) else value
        if len(props) == MAX_PROPS:
            break
    return props or None


def _page(url: str, hash_mode: bool) -> tuple[str | None, str | None]:
    """(page_url, path) of the event: the URL, whose path pulse takes from it; in hash mode the path holds the
    fragment too (`/#/settings`), which a URL's path cannot, so it is given as the path itself."""
    parts = urlsplit(url)
    if hash_mode and parts.fragment:
        return None, (parts.path or "/") + "#" + parts.fragment
    return url, None


def decode(body: bytes) -> tuple[list[str], IngestEvent | None]:
    """The event's domains, and the pulse event to record (None for an engagement event)."""
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raw = None
    if not isinstance(raw, dict):
        raise BadEvent("request", "Unable to parse request body as json")
    name = _first(raw, "n", "name")
    if isinstance(name, int) and not isinstance(name, bool):  # 404 tracking may send a number
        name = str(name)
    if not isinstance(name, str) or not name:
        raise BadEvent("event_name", "can't be blank")
    if len(name) > MAX_EVENT_NAME:
        raise BadEvent("event_name", f"should be at most {MAX_EVENT_NAME} character(s)")
    url = _first(raw, "u", "url")
    if not isinstance(url, str) or not url:
        raise BadEvent("url", "is required")
    if len(url) > MAX_URL:
        raise BadEvent("url", f"should be at most {MAX_URL} character(s)")
    if url.lower().startswith("data:"):
        raise BadEvent("url", "is invalid")
    domain = _first(raw, "d", "domain")
    if domain is None:  # Plausible's rule: the site is the URL's host
        domain = urlsplit(url).hostname or ""
        domain = domain[4:] if domain.startswith("www.") else domain
    if not isinstance(domain, str) or not domain.strip(" ,"):
        raise BadEvent("domain", "can't be blank")
    domains = list(dict.fromkeys(d.strip().lower() for d in domain.split(",") if d.strip()))
    if name == ENGAGEMENT:
        if not any(isinstance(raw.get(key), int) and not isinstance(raw.get(key), bool) for key in ("sd", "e")):
            raise BadEvent("event_name", "engagement event requires a valid integer value for at least one of"
                                         " 'sd' or 'e' fields")
        return domains, None
    referrer = _first(raw, "r", "referrer")
    if referrer is not None and not isinstance(referrer, str):
        raise BadEvent("referrer", "is invalid")
    hash_mode = _first(raw, "h", "hashMode")
    if hash_mode is not None and (not isinstance(hash_mode, int) or isinstance(hash_mode, bool)):
        raise BadEvent("hash_mode", "is invalid")
    interactive = _first(raw, "i", "interactive")
    if interactive is not None and not isinstance(interactive, bool):
        raise BadEvent("interactive", "is invalid")
    props = _props(_first(raw, "m", "meta", "p", "props"))
    page_url, path = _page(url, hash_mode == 1)
    if path is not None:
        props = {**(props or {}), "path": path}
    event = IngestEvent(
        event=PAGE_VIEW if name == PAGEVIEW else name[:MAX_NAME],
        page_url=page_url,
        referrer=referrer[:MAX_URL] if referrer else None,
        properties=props,
        # the window's width (innerWidth), which Plausible's own screen classes are made of
        screen_width=fitting_width(_first(raw, "w", "screen_width")),
    )
    return domains, event


@routes.post("/api/event")
async def event(request: web.Request) -> web.Response:
    try:
        return await _event(request)
    except ApiError as exc:  # refused by pulse's own checks (origin, rate, storage): in Plausible's shape
        request.app[METRICS].ingest_rejected[exc.status] += 1
        return _errors(exc.status, exc.field or "request", exc.message, exc.headers)
    except BadEvent as exc:
        request.app[METRICS].ingest_rejected[400] += 1
        return _errors(400, exc.field, exc.message)


async def _event(request: web.Request) -> web.Response:
    body = await read_body(request)
    received = time.time_ns() // 1_000_000
    domains, found = decode(body)
    if found is None:  # engagement: Plausible's time on page, which pulse does not keep
        return _accepted(0)
    agent = visitor_agent(request)
    bot = parse_agent(agent).is_bot  # stored as a bot's, for the bots report; answered as Plausible does
    keyring = request.app[KEYRING]
    projects: list[Project] = []
    for domain in domains:
        project = keyring.by_domain(domain)
        if project is not None and project not in projects:
            projects.append(project)
    dropped = len(domains) - len(projects)
    ips = [admit(request, project) for project in projects]
    # each project's event is stored in its own job; all are awaited, so none of their outcomes goes unseen
    outcomes = await asyncio.gather(*(store_events(request, project, ip, agent, [found], None, received)
                                      for project, ip in zip(projects, ips)), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return _accepted(len(domains) if bot else dropped)
