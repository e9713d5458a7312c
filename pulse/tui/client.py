"""The dashboard's one way to the server: HTTP for queries, a WebSocket for the live feed, with reconnects.

No Textual here: the client is plain asyncio, so scripts and tests can use it on their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import msgspec

from pulse.config import SERVER_FILENAME
from pulse.protocol import (
    CLOSE_TOKEN_REVOKED, ErrorBody, EventsPage, Funnel, Goals, LiveDropped, LiveEvent, LiveEvents, Overview, Paths,
    ProjectList, ProjectRow, RankedRows, Retention, SessionsPage, Timeseries, UsersPage, UserTimeline, live_decoder,
)

T = TypeVar("T")

# the bodies of the read API's answers the dashboard reads
PROJECTS = msgspec.json.Decoder(ProjectList)
OVERVIEW = msgspec.json.Decoder(Overview)
TIMESERIES = msgspec.json.Decoder(Timeseries)
RANKED_ROWS = msgspec.json.Decoder(RankedRows)  # top events, breakdowns, property and trait keys and values
USERS_PAGE = msgspec.json.Decoder(UsersPage)
SESSIONS_PAGE = msgspec.json.Decoder(SessionsPage)
EVENTS_PAGE = msgspec.json.Decoder(EventsPage)
USER_TIMELINE = msgspec.json.Decoder(UserTimeline)
GOALS = msgspec.json.Decoder(Goals)
FUNNEL = msgspec.json.Decoder(Funnel)
RETENTION = msgspec.json.Decoder(Retention)
PATHS = msgspec.json.Decoder(Paths)
ERROR = msgspec.json.Decoder(ErrorBody)


class ApiFailure(Exception):
    """The server answered with an error, or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Connection:
    url: str
    token: str


def discover(data_dir: Path) -> Connection:
    """The local server's address and operator token, from the server.json it keeps in its data directory.

    That file is readable by the data directory's owner only; anyone who can read it can read the database.
    """
    path = data_dir / SERVER_FILENAME
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ApiFailure(0, f"no pulse server is running on {data_dir} (no {path}); start `pulse serve`,"
                            " pass --data-dir, or give --url and --token") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ApiFailure(0, f"{path} is readable by others; refusing to use its token (chmod 600 it)")
    if info.st_uid != os.getuid():
        raise ApiFailure(0, f"{path} belongs to another user; run `pulse tui` as the user that runs the server")
    try:
        found = json.loads(path.read_text())
        return Connection(found["url"], found["token"])
    except PermissionError:
        raise ApiFailure(0, f"cannot read {path}: run `pulse tui` as the user that runs the server") from None
    except (ValueError, KeyError, TypeError):
        raise ApiFailure(0, f"{path} is not a pulse server file; is the server a newer version?") from None


@dataclass
class LiveState:
    """Where the live feed stands: connecting, live, or waiting to reconnect (with why)."""

    status: str  # "connecting" | "live" | "retrying" | "failed"
    detail: str = ""
    retry_in: float = 0.0


@dataclass
class Backoff:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s … up to `ceiling`, reset after a success."""

    base: float = 0.5
    ceiling: float = 10.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        delay = min(self.ceiling, self.base * 2 ** self.attempt)
        self.attempt += 1
        return delay * (0.8 + 0.4 * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


class PulseClient:
    def __init__(self, url: str, token: str, *, timeout_s: float = 20.0,
                 rediscover: Callable[[], Connection] | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        # on the server's host: where to look again for the address and token after a server restart
        self.rediscover = rediscover
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def renew(self) -> bool:
        """After a 401: whether the local server now has another address or token (it restarted)."""
        if self.rediscover is None:
            return False
        try:
            found = self.rediscover()
        except ApiFailure:
            return False
        if (found.url.rstrip("/"), found.token) == (self.url, self.token):
            return False
        self.url, self.token = found.url.rstrip("/"), found.token
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, path: str, decoder: msgspec.json.Decoder[T], params: dict[str, str] | None = None) -> T:
        try:
            return await self._get(path, decoder, params)
        except ApiFailure as failure:
            if failure.status == 401 and self.renew():
                return await self._get(path, decoder, params)
            raise

    async def _get(self, path: str, decoder: msgspec.json.Decoder[T], params: dict[str, str] | None) -> T:
        try:
            async with self.session.get(f"{self.url}{path}", params=params, headers=self.auth) as response:
                if response.status >= 400:
                    raise ApiFailure(response.status, await _error_text(response))
                body = await response.read()
            try:
                return decoder.decode(body)
            except msgspec.DecodeError as exc:
                raise ApiFailure(response.status, f"{path}: not an answer this dashboard understands ({exc});"
                                                  " is the server another version?") from None
        except aiohttp.ClientError as exc:
            raise ApiFailure(0, f"cannot reach {self.url}: {_reason(exc)}") from None
        except asyncio.TimeoutError:
            raise ApiFailure(0, f"{self.url} did not answer in {self.timeout.total:.0f} s") from None

    async def projects(self) -> list[ProjectRow]:
        return (await self.get("/api/v1/projects", PROJECTS)).projects

    async def project_get(self, project_id: int, endpoint: str, params: dict[str, str],
                          decoder: msgspec.json.Decoder[T] = RANKED_ROWS) -> T:
        """One project's answer, decoded by `decoder` (RankedRows, what most endpoints answer, unless told)."""
        return await self.get(f"/api/v1/projects/{project_id}/{endpoint}", decoder, params)

    async def live(self, project_id: int, on_events: Callable[[list[LiveEvent]], None],
                   on_state: Callable[[LiveState], None], *, on_dropped: Callable[[int], None] | None = None,
                   backoff: Backoff | None = None) -> None:
        """Follow a project's live feed until cancelled, reconnecting with backoff whenever it drops."""
        backoff = backoff or Backoff()
        while True:
            on_state(LiveState("connecting"))
            reason = ""
            url = f"{self.url}/api/v1/ws/events/{project_id}"
            try:
                async with self.session.ws_connect(url, headers=self.auth, heartbeat=20.0,
                                                   timeout=aiohttp.ClientWSTimeout(ws_close=5),
                                                   max_msg_size=16 * 1024 * 1024) as ws:
                    backoff.reset()
                    on_state(LiveState("live"))
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            break
                        decoded = live_decoder.decode(message.data)
                        if isinstance(decoded, LiveEvents):
                            on_events(decoded.events)
                        elif isinstance(decoded, LiveDropped) and on_dropped is not None:
                            on_dropped(decoded.count)  # the server skipped these: this client read too slowly
                    if ws.close_code == CLOSE_TOKEN_REVOKED:
                        on_state(LiveState("failed", "the read token was rotated; restart with the new one"))
                        return
                    reason = f"the server closed the feed ({ws.close_code})"
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401 and self.renew():
                    continue  # the local server restarted with a new token: use it
                if exc.status in (401, 403, 404):
                    why = {401: "the token is not valid (rotated, or the server restarted)",
                           403: "the token may not read this project", 404: "no such project"}[exc.status]
                    on_state(LiveState("failed", f"live feed refused ({exc.status}): {why}"))
                    return
                reason = f"handshake failed: {exc.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, msgspec.DecodeError) as exc:
                reason = _reason(exc)
            delay = backoff.next()
            on_state(LiveState("retrying", reason, retry_in=delay))
            await asyncio.sleep(delay)


class SelfTracker:
    """Sends the dashboard's own usage to a pulse project as events (`pulse tui --track-self KEY`)."""

    def __init__(self, url: str, ingest_key: str, distinct_id: str) -> None:
        self.url = url.rstrip("/")
        self.key = ingest_key
        self.distinct_id = distinct_id
        self.pending: list[dict] = []
        self.sent = 0
        self.failures = 0
        self._session: aiohttp.ClientSession | None = None

    def track(self, name: str, /, **properties: object) -> None:
        self.pending.append({"event": name, "distinct_id": self.distinct_id,
                             "timestamp": time.time_ns() // 1_000_000,
                             "properties": {k: v for k, v in properties.items() if v is not None}})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def flush(self) -> None:
        if not self.pending:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        batch, self.pending = self.pending, []
        try:
            async with self._session.post(f"{self.url}/api/v1/events/ingest", json={"events": batch},
                                          headers={"X-API-Key": self.key}) as response:
                if response.status == 202:
                    self.sent += len(batch)
                    return
                if response.status < 500 and response.status != 429:
                    self.failures += len(batch)  # a bad key will not get better: drop, do not retry
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        self.pending[:0] = batch[-1000:]  # try again next time, keeping a bounded backlog


async def _error_text(response: aiohttp.ClientResponse) -> str:
    try:
        return f"{response.status}: {ERROR.decode(await response.read()).error}"
    except msgspec.DecodeError:  # not pulse's error body: a proxy's page, say
        return f"{response.status} {response.reason}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection refused ({exc.host}:{exc.port})" if "refused" in str(exc).lower() else str(exc.os_error)
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
