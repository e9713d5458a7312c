"""POST /api/v1/events/ingest: decode, validate, hand to the writer, answer after the commit."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from aiohttp import web

from pulse.protocol import IngestAck, batch_decoder, json_encoder, to_ms
from pulse.server.errors import ApiError, validation_error
from pulse.server.keys import KEYRING, METRICS, RATE_BY_IP, RATE_BY_KEY, SETTINGS, STORE
from pulse.server.limits import is_loopback, retry_after
from pulse.storage.model import IngestJob, ProjectGone, QueueFull, WriteFailed, WriterClosed, WriterStalled

routes = web.RouteTableDef()
_JSON = {"Content-Type": "application/json"}


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()


def client_ip(request: web.Request, trust_proxy: bool) -> str:
    if trust_proxy:
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:
            return forwarded.split(",", 1)[0].strip()
    return request.remote or ""


@routes.post("/api/v1/events/ingest")
async def ingest(request: web.Request) -> web.Response:
    try:
        return await _ingest(request)
    except ApiError as exc:
        request.app[METRICS].ingest_rejected[exc.status] += 1
        raise


def _limit(request: web.Request, ip: str, key: str) -> None:
    app = request.app
    wait = 0.0 if is_loopback(ip) else app[RATE_BY_IP].take(ip)
    if not wait:
        wait = app[RATE_BY_KEY].take(key)
    if wait:
        raise ApiError(429, "too many requests: slow down, or send more events per batch",
                       headers={"Retry-After": retry_after(wait)})


async def _ingest(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    project = app[KEYRING].ingest(request)
    origin = request.headers.get("Origin")
    if not project.origin_allowed(origin):
        raise ApiError(403, f"origin {origin!r} may not send events to this project (allowed:"
                            f" {project.allowed_origins})")
    ip = client_ip(request, settings.trust_proxy)
    _limit(request, ip, str(project.id))
    # a body that came with the headers needs no timer
    timer = contextlib.nullcontext() if request.content.is_eof() else asyncio.timeout(settings.body_timeout_s)
    try:
        async with timer:
            body = await request.read()
    except TimeoutError:
        raise ApiError(408, f"request body did not arrive within {settings.body_timeout_s:g} s",
                       field="body") from None
    received = time.time_ns() // 1_000_000
    try:
        batch = batch_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", field="body") from None
    except UnicodeDecodeError:
        raise ApiError(400, "body is not valid UTF-8", field="body") from None
    skew = 0
    if batch.sent_at is not None:
        skew = received - to_ms(batch.sent_at)
    job = IngestJob(
        project_id=project.id,
        events=batch.events,
        received_ms=received,
        skew_ms=skew,
        ip=ip,
        user_agent=request.headers.get("User-Agent", "")[:512],
        project_domain=project.domain,
    )
    try:
        future = app[STORE].enqueue(job)
    except (QueueFull, WriterStalled) as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    except WriterClosed as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
    if settings.ack == "enqueue":
        future.add_done_callback(_retrieve)
        accepted, duplicates = len(batch.events), 0
    else:
        try:
            accepted, duplicates = await future
        except WriteFailed as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
        except ProjectGone:  # deleted while the batch was queued: as if the key had been refused at once
            raise ApiError(401, "invalid or revoked ingest key") from None
        except WriterStalled as exc:  # past the write deadline: the batch stays queued and may be stored
            raise ApiError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    return web.Response(status=202, body=json_encoder.encode(IngestAck(accepted, duplicates)), headers=_JSON)
