"""POST /api/v1/events/ingest: decode, validate, hand to the store, answer after the commit.

The steps are shared with the endpoints that take other products' formats (`server/dropin/`): `admit` (the
project's allowed origins and the rate limits), `read_body` (within the body timeout), `store_events` (one
job per visitor, queued, answered once durable).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time

import msgspec
from aiohttp import web

from pulse.config import Settings, proxy_networks
from pulse.enrich import base_language, header_language
from pulse.protocol import MAX_AGENT, MAX_LANGUAGE, MAX_SCREEN_WIDTH, IngestAck, IngestEvent, batch_decoder, json_encoder, to_ms
from pulse.server.errors import ApiError, validation_error
from pulse.server.keys import COUNTRIES, KEYRING, METRICS, RATE_BY_IP, RATE_BY_KEY, SETTINGS, STORE
from pulse.server.limits import is_loopback, retry_after
from pulse.storage.model import (
    IngestJob, Project, ProjectGone, QueueFull, WriteFailed, WriterClosed, WriterStalled,
)

routes = web.RouteTableDef()
_JSON = {"Content-Type": "application/json"}
# what a browser (or a crawler passing for one) puts first in its User-Agent; anything else in the request's
# header is an HTTP client library's (urllib, requests, node, Go, curl, an SDK), which says nothing about
# the visitor
_BROWSER_PREFIXES = ("Mozilla/", "Opera/")


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()


def client_ip(request: web.Request, settings: Settings) -> str:
    """The client's address: the direct peer's, or with `trust_proxy`, when the peer is a trusted proxy, the
    right-most address its forwarding headers name that is not a trusted proxy's.

    Each proxy appends the address it was connected from, so the entries to the right of the first untrusted
    one were written by trusted proxies and the ones to its left by the client itself (anything at all, as
    werkzeug's ProxyFix and uvicorn read them too). One header is read: Forwarded (RFC 7239, its `for=`),
    else X-Forwarded-For, else X-Real-IP. An entry that is no address (`unknown`, an obfuscated name) ends
    the walk at the trusted hop after it; when every entry is a trusted proxy's, the left-most is the client.
    """
    peer = request.remote or ""
    if not settings.trust_proxy:
        return peer
    trusted = proxy_networks(settings.trusted_proxies)
    address = _address(peer)
    if address is None or not _within(address, trusted):
        return peer
    headers = request.headers
    if "Forwarded" in headers:
        chain = [_forwarded_for(element) for element in ",".join(headers.getall("Forwarded")).split(",")]
    elif "X-Forwarded-For" in headers:
        chain = ",".join(headers.getall("X-Forwarded-For")).split(",")
    else:
        chain = headers.getall("X-Real-IP", [])
    for entry in reversed(chain):
        hop = _address(entry)
        if hop is None:
            break
        address = hop
        if not _within(address, trusted):
            break
    return str(address)


def _within(address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: tuple) -> bool:
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a header's entry: bare, `[IPv6]` or with a port (`1.2.3.4:80`, `[::1]:80`); None if
    the entry is none."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _forwarded_for(element: str) -> str:
    """The `for=` value of one element of a Forwarded header ("" when it has none)."""
    for pair in element.split(";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "for":
            return value
    return ""


def visitor_agent(request: web.Request) -> str:
    """The request's User-Agent when a browser sent it; "" (unknown, and so never a bot) when a backend did."""
    agent = request.headers.get("User-Agent", "")
    return agent[:MAX_AGENT] if agent.startswith(_BROWSER_PREFIXES) else ""


def fitting_language(value: object) -> str | None:
    """A language another product's tracker sent, when pulse's own ingest would take it; else None (not kept).
    Their formats say nothing of its shape, so a value pulse would refuse is left out rather than refused."""
    if isinstance(value, str) and len(value) <= MAX_LANGUAGE and base_language(value) is not None:
        return value
    return None


def fitting_width(value: object) -> int | None:
    """A screen width another product's tracker sent, when pulse's own ingest would take it; else None."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SCREEN_WIDTH:
        return value
    return None


def visitor_language(request: web.Request) -> str | None:
    """The base language of the request's Accept-Language when a browser sent it (as for visitor_agent), for
    events that carry no language of their own; None when a backend did, or the header is no language tag."""
    if not visitor_agent(request):
        return None
    return header_language(request.headers.get("Accept-Language"))


@routes.post("/api/v1/events/ingest")
async def ingest(request: web.Request) -> web.Response:
    try:
        return await _ingest(request)
    except ApiError as exc:
        request.app[METRICS].ingest_rejected[exc.status] += 1
        raise


def admit(request: web.Request, project: Project) -> str:
    """Refuse a browser on an origin the project does not allow, and a client over its rate; the client's IP."""
    app = request.app
    origin = request.headers.get("Origin")
    if not project.origin_allowed(origin):
        raise ApiError(403, f"origin {origin!r} may not send events to this project (allowed:"
                            f" {project.allowed_origins})")
    ip = client_ip(request, app[SETTINGS])
    wait = 0.0 if is_loopback(ip) else app[RATE_BY_IP].take(ip)
    if not wait:
        wait = app[RATE_BY_KEY].take(str(project.id))
    if wait:
        raise ApiError(429, "too many requests: slow down, or send more events per batch",
                       headers={"Retry-After": retry_after(wait)})
    return ip


async def read_body(request: web.Request) -> bytes:
    """The whole body, within the body timeout (408 otherwise)."""
    settings = request.app[SETTINGS]
    # a body that came with the headers needs no timer
    timer = contextlib.nullcontext() if request.content.is_eof() else asyncio.timeout(settings.body_timeout_s)
    try:
        async with timer:
            return await request.read()
    except TimeoutError:
        raise ApiError(408, f"request body did not arrive within {settings.body_timeout_s:g} s",
                       field="body") from None


def _visitors(events: list[IngestEvent], ip: str, agent: str) -> dict[tuple[str, str], list[IngestEvent]]:
    """The events by visitor: the request's IP and browser, unless an event names its own (a backend's)."""
    if all(ev.ip is None and ev.user_agent is None for ev in events):
        return {(ip, agent): events}
    found: dict[tuple[str, str], list[IngestEvent]] = {}
    for index, ev in enumerate(events):
        if ev.ip is not None:
            try:
                ipaddress.ip_address(ev.ip)
            except ValueError:
                raise ApiError(400, f"events[{index}].ip: not an IPv4 or IPv6 address: {ev.ip!r}",
                               field=f"events[{index}].ip", index=index) from None
        visitor = (ev.ip if ev.ip is not None else ip, ev.user_agent if ev.user_agent is not None else agent)
        found.setdefault(visitor, []).append(ev)
    return found


async def store_events(request: web.Request, project: Project, ip: str, agent: str, events: list[IngestEvent],
                       sent_at_ms: int | None, received_ms: int) -> tuple[int, int]:
    """Queue the events (one job per visitor) and wait until they are durable: (accepted, duplicates).

    With `--ack enqueue` the answer comes once they are queued. The jobs of one call are queued together, so
    the writer takes them into the same commit."""
    app = request.app
    skew = 0 if sent_at_ms is None else received_ms - sent_at_ms
    store = app[STORE]
    countries = app[COUNTRIES]
    language = visitor_language(request)
    futures = []
    visitors = _visitors(events, ip, agent)
    # looked up before any job is queued, so that the jobs of one call still go to the writer together
    found = [await countries.country(visitor_ip) for visitor_ip, _ in visitors]
    for ((visitor_ip, visitor_agent_), group), country in zip(visitors.items(), found):
        job = IngestJob(project_id=project.id, events=group, received_ms=received_ms, skew_ms=skew,
                        ip=visitor_ip, user_agent=visitor_agent_, project_domain=project.domain,
                        country=country, language=language)
        try:
            futures.append(store.enqueue(job))
        except (QueueFull, WriterStalled) as exc:
            _abandon(futures)
            raise ApiError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except WriterClosed as exc:
            _abandon(futures)
            raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
    if app[SETTINGS].ack == "enqueue":
        _abandon(futures)
        return len(events), 0
    accepted = duplicates = 0
    try:
        for future in futures:
            stored, repeated = await future
            accepted += stored
            duplicates += repeated
    except WriteFailed as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
    except ProjectGone:  # deleted while the batch was queued: as if the key had been refused at once
        raise ApiError(401, "invalid or revoked ingest key") from None
    except WriterStalled as exc:  # past the write deadline: the batch stays queued and may be stored
        raise ApiError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    finally:
        _abandon(futures)
    return accepted, duplicates


def _abandon(futures: list[asyncio.Future]) -> None:
    """Nobody awaits these any more: their outcome is retrieved when it comes, so none is logged as lost."""
    for future in futures:
        future.add_done_callback(_retrieve)


async def _ingest(request: web.Request) -> web.Response:
    project = await request.app[KEYRING].ingest_current(request)
    ip = admit(request, project)
    body = await read_body(request)
    received = time.time_ns() // 1_000_000
    try:
        batch = batch_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", field="body") from None
    except UnicodeDecodeError:
        raise ApiError(400, "body is not valid UTF-8", field="body") from None
    accepted, duplicates = await store_events(request, project, ip, visitor_agent(request), batch.events,
                                              to_ms(batch.sent_at), received)
    return web.Response(status=202, body=json_encoder.encode(IngestAck(accepted, duplicates)), headers=_JSON)
