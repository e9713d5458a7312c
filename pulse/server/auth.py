"""Ingest keys and read tokens: kept in memory by digest, reloaded as soon as the catalog changes."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from pulse.server.errors import ApiError
from pulse.storage.base import Store
from pulse.storage.model import INGEST, READ, SHARE, KeyGrant, Project, digest, now_ms

log = logging.getLogger(__name__)

# an ingest key the keyring does not know makes it look at the catalog once (a key just made by the CLI works
# before the next poll); then the key is refused for this long without another look, and at most this many
# such keys are remembered, so unknown keys sent again and again cost one dictionary lookup each
UNKNOWN_KEY_S = 1.0
UNKNOWN_KEYS_MAX = 10_000
# a browser's WebSocket cannot send an Authorization header: the web dashboard offers the subprotocols
# `pulse.bearer, TOKEN`, so the token stays out of the URL (and out of a proxy's access log)
BEARER_PROTOCOL = "pulse.bearer"


class KeyRing:
    """Every key's grant by SHA-256 digest, and every project, as of the last catalog version."""

    def __init__(self, store: Store, operator_token: str = "") -> None:
        self.store = store
        # the token of tools on this host (`pulse tui`): reads every project while this server runs
        self.operator = digest(operator_token) if operator_token else None
        self.version = -1
        self.grants: dict[bytes, KeyGrant] = {}
        self.projects: dict[int, Project] = {}
        # called whenever a grant may have ended: after each reload, and when a grace period runs out
        self.on_reload: Callable[[], Awaitable[None]] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_task: asyncio.Task | None = None  # kept: the loop holds tasks weakly
        # the projects by a field (site id, domain), built again when a reload replaces `projects`
        self._indexes: dict[str, tuple[dict[int, Project], dict[str, Project]]] = {}
        # digest of an unknown ingest key -> when it may make the keyring look at the catalog again (monotonic)
        self._unknown: dict[bytes, float] = {}
        self._catching_up: asyncio.Future | None = None  # the look at the catalog under way, shared

    async def reload(self) -> None:
        catalog = await self.store.catalog()
        self.version, self.grants, self.projects = catalog.version, catalog.grants, catalog.projects
        self._schedule_expiry()
        if self.on_reload is not None:
            await self.on_reload()

    def _schedule_expiry(self) -> None:
        """Run on_reload again when the next grace period ends: the catalog does not change then."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        now = now_ms()
        upcoming = [g.expires_at for g in self.grants.values() if g.expires_at is not None and g.expires_at > now]
        if upcoming:
            self._expiry = asyncio.get_running_loop().call_later((min(upcoming) - now) / 1000, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._expiry_task = asyncio.create_task(self._after_expiry(), name="pulse-keyring-expiry")

    async def _after_expiry(self) -> None:
        try:
            if self.on_reload is not None:
                await self.on_reload()
        except Exception:
            log.exception("ending expired grants failed")
        self._schedule_expiry()

    async def close(self) -> None:
        """Stop waiting for grace periods to end (the server is stopping)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task

    def is_operator_secret(self, secret: str) -> bool:
        return self.is_operator(digest(secret))

    def is_operator(self, token_digest: bytes) -> bool:
        return self.operator is not None and hmac.compare_digest(token_digest, self.operator)

    def grants_read(self, token_digest: bytes, project_id: int) -> bool:
        if self.is_operator(token_digest):
            return project_id in self.projects
        found = self.grants.get(token_digest)
        return (found is not None and found.kind in (READ, SHARE) and found.project_id == project_id
                and found.valid(now_ms()) and project_id in self.projects)

    def is_share(self, token_digest: bytes) -> bool:
        """Whether this token is a share link's (it reads the dashboard's aggregates only)."""
        found = self.grants.get(token_digest)
        return found is not None and found.kind == SHARE

    async def watch(self, interval: float) -> None:
        """Reload whenever another process (the CLI) changes projects or keys."""
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.store.catalog_version() != self.version:
                    await self.reload()
            except Exception:
                log.exception("reloading keys failed")

    def grant(self, secret: str) -> KeyGrant | None:
        found = self.grants.get(digest(secret))
        if found is None or not found.valid(now_ms()) or found.project_id not in self.projects:
            return None
        return found

    def by_site_id(self, site_id: str) -> Project | None:
        """The project with this site id (what Umami's trackers send as `website`), if any."""
        return self._index("site_id").get(site_id.lower())

    def by_domain(self, domain: str) -> Project | None:
        """The project with this domain (what Plausible's trackers send), the oldest if several share it."""
        return self._index("domain").get(domain.lower())

    def _index(self, field: str) -> dict[str, Project]:
        built = self._indexes.get(field)
        if built is None or built[0] is not self.projects:
            found: dict[str, Project] = {}
            for project in sorted(self.projects.values(), key=lambda p: p.id):
                value = getattr(project, field)
                if value:
                    found.setdefault(value.lower(), project)
            built = self._indexes[field] = (self.projects, found)
        return built[1]

    def ingest(self, request: web.Request) -> Project:
        """The project an ingest request is for, from `X-API-Key` or `?key=`."""
        secret = request.headers.get("X-API-Key") or request.query.get("key")
        if not secret:
            raise ApiError(401, "missing ingest key: send it in the X-API-Key header or the key query parameter")
        return self.ingest_project(secret)

    def ingest_project(self, secret: str) -> Project:
        """The project an ingest key sends to, wherever the request carried it (401 or 403 otherwise)."""
        return self._ingest_grant(self.grant(secret))

    def _ingest_grant(self, found: KeyGrant | None) -> Project:
        if found is None:
            raise ApiError(401, "invalid or revoked ingest key")
        if found.kind != INGEST:
            raise ApiError(403, "this is a read token; sending events needs the project's ingest key (pk_…)")
        return self.projects[found.project_id]

    async def ingest_current(self, request: web.Request) -> Project:
        """`ingest`, for a key made a moment ago too: an unknown key is looked for in the catalog once (one
        reload, if its version changed) before it is refused."""
        secret = request.headers.get("X-API-Key") or request.query.get("key")
        if not secret:
            return self.ingest(request)  # the 401 for a missing key
        found = self.grant(secret)
        if found is None:
            key_digest = digest(secret)
            if self._unknown.get(key_digest, 0.0) <= time.monotonic():
                await self._catch_up()
                found = self.grant(secret)
                if found is None:
                    if len(self._unknown) >= UNKNOWN_KEYS_MAX:
                        self._unknown.clear()
                    self._unknown[key_digest] = time.monotonic() + UNKNOWN_KEY_S
        return self._ingest_grant(found)

    async def _catch_up(self) -> None:
        """Reload if the catalog changed since the last reload, by a look that starts after this call (one
        under way may have read the catalog before the key was made); calls waiting meanwhile share it."""
        if self._catching_up is not None:
            await asyncio.shield(self._catching_up)
        if self._catching_up is None:
            self._catching_up = asyncio.ensure_future(self._reload_if_changed())
            self._catching_up.add_done_callback(self._caught_up)
        await asyncio.shield(self._catching_up)

    def _caught_up(self, _: asyncio.Future) -> None:
        self._catching_up = None

    async def _reload_if_changed(self) -> None:
        try:
            if await self.store.catalog_version() != self.version:
                await self.reload()
        except Exception:  # the key is refused as it would have been without the look
            log.exception("reloading keys failed")

    def read(self, request: web.Request, project_id: int, *, shared: bool = False) -> Project:
        """The project a read request may see, from `Authorization: Bearer sk_…` (or `?token=`); a share link's
        token only where `shared` (the dashboard's aggregates)."""
        return self.read_grant(request, project_id, shared=shared)[0]

    def read_grant(self, request: web.Request, project_id: int, *, shared: bool = False) -> tuple[Project, bytes]:
        """The project a read request may see, and the digest of the token that allows it."""
        token_digest, visible = self._readable(request)
        if project_id not in visible:
            if self.is_operator(token_digest):
                raise ApiError(404, f"no project {project_id}")
            raise ApiError(403, f"this token does not grant access to project {project_id}")
        if not shared and self.is_share(token_digest):
            raise ApiError(403, "a share link reads only the dashboard's numbers; this needs the project's read"
                                " token (sk_…)")
        return self.projects[project_id], token_digest

    def readable(self, request: web.Request) -> list[Project]:
        """Every project the request's read token may see: one, or all for the operator token."""
        _, visible = self._readable(request)
        return [self.projects[i] for i in sorted(visible)]

    def _readable(self, request: web.Request) -> tuple[bytes, set[int]]:
        header = request.headers.get("Authorization", "")
        secret = header[7:].strip() if header[:7].lower() == "bearer " else request.query.get("token")
        if not secret:
            offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
            if len(offered) == 2 and offered[0] == BEARER_PROTOCOL:
                secret = offered[1]
        if not secret:
            raise ApiError(401, "missing read token: send Authorization: Bearer sk_…",
                           headers={"WWW-Authenticate": "Bearer"})
        token_digest = digest(secret)
        if self.is_operator(token_digest):
            return token_digest, set(self.projects)
        found = self.grant(secret)
        if found is None:
            raise ApiError(401, "invalid or revoked read token", headers={"WWW-Authenticate": "Bearer"})
        if found.kind == INGEST:
            raise ApiError(403, "ingest keys cannot read; use the project's read token (sk_…)")
        return token_digest, {found.project_id}
