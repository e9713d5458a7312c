"""The live feed: committed events fanned out to WebSocket clients, each with a bounded buffer.

The writer hands every committed batch to `LiveHub.publish` on the event loop. Publishing only appends
to per-client buffers; a client that reads too slowly loses events (counted and reported to it), so no
client can slow ingest down. A feed is closed (4001) once its read token no longer grants the project:
rotated without a grace period, deleted with it, or at the end of the grace period.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Callable

import msgspec
from aiohttp import WSCloseCode, web

from pulse.enrich import parse_agent
from pulse.protocol import CLOSE_TOKEN_REVOKED, LiveDropped, LiveEvent, LiveEvents, LiveHello, json_encoder
from pulse.server.auth import BEARER_PROTOCOL
from pulse.server.errors import ApiError
from pulse.storage.model import CommittedEvent

log = logging.getLogger(__name__)

MAX_EVENTS_PER_MESSAGE = 500

# whether a token (by digest) still grants a project: KeyRing.grants_read
Grants = Callable[[bytes, int], bool]


class LiveClient:
    def __init__(self, ws: web.WebSocketResponse, project_id: int, token_digest: bytes, event: str | None,
                 buffer_events: int, grants: Grants | None = None, shared: bool = False) -> None:
        self.ws = ws
        self.shared = shared  # a share link's feed: each event's name, path and time only
        self.project_id = project_id
        self.token_digest = token_digest
        self.grants = grants
        self.event = event
        self.buffer: collections.deque[CommittedEvent] = collections.deque()
        self.capacity = buffer_events
        self.dropped = 0
        self.wake = asyncio.Event()

    def offer(self, events: list[CommittedEvent]) -> None:
        for item in events:
            if self.event is not None and item.event != self.event:
                continue
            if len(self.buffer) >= self.capacity:
                self.dropped += 1
            else:
                self.buffer.append(item)
        self.wake.set()

    def granted(self) -> bool:
        return self.grants is None or self.grants(self.token_digest, self.project_id)

    async def end(self) -> None:
        """Close the socket because the token no longer grants the project; what is buffered is not sent."""
        self.buffer.clear()
        await self.ws.close(code=CLOSE_TOKEN_REVOKED, message=b"read token revoked")

    async def pump(self) -> None:
        """Send what is buffered, as it comes, until the socket closes or the token stops granting it.

        The grant is checked before every message: a grace period that has just run out ends the feed
        even before the keyring's timer closes it.
        """
        ws = self.ws
        while not ws.closed:
            await self.wake.wait()
            self.wake.clear()
            if not self.granted():
                await self.end()
                return
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                await ws.send_str(json_encoder.encode(LiveDropped(dropped)).decode())
            while self.buffer and not ws.closed:
                if not self.granted():
                    await self.end()
                    return
                batch = [_live_event(self.buffer.popleft(), self.shared)
                         for _ in range(min(len(self.buffer), MAX_EVENTS_PER_MESSAGE))]
                await ws.send_str(json_encoder.encode(LiveEvents(batch)).decode())


def _live_event(item: CommittedEvent, shared: bool = False) -> LiveEvent:
    if shared:  # nothing that tells one visitor from another
        return LiveEvent(event=item.event, ts=item.ts, path=item.path)
    agent = parse_agent(item.user_agent)
    return LiveEvent(
        event=item.event, ts=item.ts, distinct_id=item.distinct_id, path=item.path,
        properties=None if item.properties is None else _raw(item.properties),
        browser=agent.browser, os=agent.os, device=agent.device,
    )


def _raw(text: str) -> msgspec.Raw:
    return msgspec.Raw(text.encode())


routes = web.RouteTableDef()


@routes.get("/api/v1/ws/events/{project}")
async def live_events(request: web.Request) -> web.StreamResponse:
    """Committed events of one project as they happen; `?event=NAME` for one event only."""
    from pulse.server.keys import KEYRING, LIVE

    raw = request.match_info["project"]
    if not raw.isdigit():
        raise ApiError(404, f"no project {raw!r}: projects are addressed by numeric id")
    keyring = request.app[KEYRING]
    project, token_digest = keyring.read_grant(request, int(raw), shared=True)
    return await request.app[LIVE].serve(request, project.id, token_digest, keyring.grants_read,
                                         shared=keyring.is_share(token_digest))


class LiveHub:
    def __init__(self, buffer_events: int = 10_000) -> None:
        self.buffer_events = buffer_events
        self.clients: dict[int, set[LiveClient]] = {}
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.dropped_total = 0

    @property
    def client_count(self) -> int:
        return sum(len(c) for c in self.clients.values())

    def wants(self, project_id: int) -> bool:
        """Whether anyone watches this project (the writer builds live events only then)."""
        return project_id in self.clients

    def publish(self, events: list[CommittedEvent]) -> None:
        """Called on the event loop with each committed batch. Never blocks."""
        if not self.clients:
            return
        by_project: dict[int, list[CommittedEvent]] = {}
        for item in events:
            if item.project_id in self.clients:
                by_project.setdefault(item.project_id, []).append(item)
        for project_id, items in by_project.items():
            for client in self.clients[project_id]:
                before = client.dropped
                client.offer(items)
                self.dropped_total += client.dropped - before

    async def serve(self, request: web.Request, project_id: int, token_digest: bytes,
                    grants: Grants | None = None, shared: bool = False) -> web.WebSocketResponse:
        """Feed one client until it leaves, or `grants` says its token no longer grants the project."""
        event = request.query.get("event") or None
        ws = web.WebSocketResponse(heartbeat=30.0, protocols=(BEARER_PROTOCOL,))
        await ws.prepare(request)
        self.sockets.add(ws)
        client = LiveClient(ws, project_id, token_digest, event, self.buffer_events, grants, shared)
        self.clients.setdefault(project_id, set()).add(client)
        pump = asyncio.create_task(client.pump(), name="pulse-live-pump")
        try:
            await ws.send_str(json_encoder.encode(LiveHello(project_id, event)).decode())
            async for _ in ws:  # clients only listen; reading keeps pings and close frames flowing
                pass
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            members = self.clients.get(project_id)
            if members is not None:
                members.discard(client)
                if not members:
                    del self.clients[project_id]
        return ws

    async def revoke(self, still_valid: Grants) -> None:
        """Close every client whose token no longer grants its project (after a key rotation, or when its
        grace period ends), all at once: each close waits for its client's answer."""
        ended = [client for members in self.clients.values() for client in members
                 if not still_valid(client.token_digest, client.project_id)]
        await asyncio.gather(*(client.end() for client in ended))

    async def close(self) -> None:
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
