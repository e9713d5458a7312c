"""The storage seam: what the server and the CLI ask of a store.

A store answers questions; how it answers them (SQLite rollups and day caches, or another engine's
materialized views) is its own business. `server/`, `cli/` and `tui/` import storage only through this module
and `pulse.storage.model` (store-neutral types); `open_store(settings)` picks the implementation (SQLite in the
data directory by default).

    async with open_store(settings) as store:               # the server: ingest, reads, catalog, live hook
        ...
    async with open_store(settings, serve=False) as store:  # the CLI: catalog, maintenance, reads; no writer

Every read question reads every event acknowledged before it was asked (the store settles whatever it
writes behind first). Every method is called on the event loop and never blocks it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pulse.protocol import (
    CohortCounts, Counts, EventRow, FunnelGroup, FunnelStep, GoalRow, OverviewStats, PathNode, ProjectSummary, Ranked,
    SessionRow, SessionStats, UserRow,
)
from pulse.storage.model import (
    Catalog, CommittedEvent, Cursor, Difference, Filters, IngestJob, IngestStats, Project, Window,
)

if TYPE_CHECKING:
    from pulse.config import Settings


class Store(abc.ABC):
    # the live feed: called on the event loop with every committed batch of the projects `wants` accepts
    on_commit: Callable[[list[CommittedEvent]], None] | None = None
    wants: Callable[[int], bool] | None = None

    # -- life cycle -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def __aenter__(self) -> Store:
        """Open (create and migrate the database where the store owns it; start the writer when serving)."""

    @abc.abstractmethod
    async def __aexit__(self, *exc: object) -> None:
        """Take no new work, write and commit everything queued, stop reads, close."""

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the store for one server: a second server on the same store, however its settings lead there,
        is refused with StoreInUse, and the store's files are made its owner's alone. Held around the server's
        whole run (entered before the store is opened, left after it is closed), so it may be taken on a store
        object of its own that is never opened. A store that arbitrates its writers itself holds nothing (this
        default)."""
        return contextlib.nullcontext()

    # -- ingest (serving stores only) ------------------------------------------------------------------

    @abc.abstractmethod
    def enqueue(self, job: IngestJob) -> asyncio.Future[tuple[int, int]]:
        """Queue a batch. The future resolves to (accepted, duplicates) once its events are durable.

        Raises QueueFull, WriterStalled or WriterClosed at once; the future fails with WriteFailed or
        ProjectGone (all in pulse.storage.model)."""

    @abc.abstractmethod
    def ingest_stats(self) -> IngestStats:
        """Queue depth, writer lag and state, commits, histograms: for /health, /metrics and `pulse status`."""

    # -- the catalog ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def catalog(self) -> Catalog:
        """Every project and every key's grant (by digest), with the catalog's version."""

    @abc.abstractmethod
    async def catalog_version(self) -> int:
        """Changes whenever a project or key changes (cheap: polled a few times a second)."""

    @abc.abstractmethod
    async def list_projects(self) -> list[Project]: ...

    @abc.abstractmethod
    async def get_project(self, ref: str | int) -> Project:
        """By id or name; raises ProjectNotFound."""

    @abc.abstractmethod
    async def create_project(self, name: str, *, domain: str | None = None, timezone: str = "UTC",
                             retention_days: int = 180, allowed_origins: str | None = None
                             ) -> tuple[Project, str, str]:
        """The new project, its ingest key and its read token (the secrets are never readable again)."""

    @abc.abstractmethod
    async def update_project(self, project: Project, *, name: str | None = None, domain: str | None = None,
                             timezone: str | None = None, retention_days: int | None = None,
                             allowed_origins: str | None = None) -> Project: ...

    @abc.abstractmethod
    async def delete_project(self, project: Project) -> None:
        """The project, its keys and all its data; batches in flight for it are refused (ProjectGone)."""

    @abc.abstractmethod
    async def rotate_key(self, project: Project, kind: str, *, grace_seconds: int = 0) -> str: ...

    @abc.abstractmethod
    async def list_keys(self, project: Project) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def list_goals(self, project: Project) -> list[dict[str, Any]]:
        """The project's declared goals (`goal`, `kind`, `created_at`), by goal."""

    @abc.abstractmethod
    async def add_goal(self, project: Project, goal: str) -> dict[str, Any]:
        """Declare a goal: a page-view path (`/thank-you`, `/blog/*`) or a custom event name. Raises ProjectError
        for a duplicate, a text that is neither, or a project that has its 100."""

    @abc.abstractmethod
    async def remove_goal(self, project: Project, goal: str) -> None:
        """Raises ProjectError when the project has no such goal."""

    @abc.abstractmethod
    async def create_share(self, project: Project, *, expires_in_s: int | None = None) -> tuple[dict[str, Any], str]:
        """A new share token (kind SHARE in the catalog's grants): its row as `list_shares` gives it, and the
        secret, shown once."""

    @abc.abstractmethod
    async def list_shares(self, project: Project) -> list[dict[str, Any]]:
        """The project's share tokens (`id`, `prefix`, `created_at`, `expires_at`, `active`), oldest first."""

    @abc.abstractmethod
    async def revoke_share(self, project: Project, ref: str) -> dict[str, Any]:
        """Delete the share token named by its id, prefix or secret; ProjectError when none or several match."""

    # -- the read questions ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def project_summary(self, project_id: int, today: Window, hour_bounds: list[int]) -> ProjectSummary: ...

    @abc.abstractmethod
    async def overview(self, project_id: int, window: Window, filters: Filters, now_ms: int) -> OverviewStats: ...

    @abc.abstractmethod
    async def timeseries(self, project_id: int, bounds: list[int], filters: Filters) -> list[Counts]:
        """Per bucket [bounds[i], bounds[i + 1])."""

    @abc.abstractmethod
    async def top_events(self, project_id: int, window: Window, filters: Filters, limit: int) -> list[Ranked]: ...

    @abc.abstractmethod
    async def breakdown(self, project_id: int, window: Window, filters: Filters, dimension: str,
                        limit: int) -> list[Ranked]: ...

    @abc.abstractmethod
    async def sessions(self, project_id: int, window: Window, filters: Filters, limit: int,
                       cursor: Cursor | None) -> tuple[SessionStats, list[SessionRow], Cursor | None]:
        """The aggregates of the sessions that started in the window, a page of them (newest first) and the
        cursor of the next page (None on the last page); users, events and user_timeline page the same way."""

    @abc.abstractmethod
    async def users(self, project_id: int, window: Window, filters: Filters, limit: int,
                    cursor: Cursor | None) -> tuple[list[UserRow], Cursor | None]: ...

    @abc.abstractmethod
    async def events(self, project_id: int, window: Window, filters: Filters, limit: int,
                     cursor: Cursor | None) -> tuple[list[EventRow], Cursor | None]: ...

    @abc.abstractmethod
    async def user_timeline(self, project_id: int, distinct_id: str, window: Window, limit: int,
                            cursor: Cursor | None) -> tuple[UserRow, list[EventRow], Cursor | None] | None:
        """None when the project has no such user."""

    @abc.abstractmethod
    async def property_keys(self, project_id: int, window: Window, filters: Filters, limit: int) -> list[Ranked]: ...

    @abc.abstractmethod
    async def property_values(self, project_id: int, window: Window, filters: Filters, key: str,
                              limit: int) -> list[Ranked]: ...

    @abc.abstractmethod
    async def trait_keys(self, project_id: int, window: Window, filters: Filters, limit: int) -> list[Ranked]:
        """Trait keys by how many users active in the window under the filters have them."""

    @abc.abstractmethod
    async def trait_values(self, project_id: int, window: Window, filters: Filters, key: str,
                           limit: int) -> list[Ranked]:
        """A trait's values by how many users active in the window under the filters have them: each count is
        the overview's unique users with that value added as a trait filter."""

    @abc.abstractmethod
    async def goals(self, project_id: int, window: Window, filters: Filters, limit: int
                    ) -> tuple[int, list[GoalRow]]:
        """Every visitor of the window, and per goal (each custom event seen, each goal declared) its visitors,
        events, conversion rate and revenue; most visitors first."""

    @abc.abstractmethod
    async def bots(self, project_id: int, window: Window, limit: int) -> list[Ranked]:
        """Bots' events and users per crawler: what every other read leaves out."""

    # -- journeys: funnels, retention, paths --------------------------------------------------------------

    @abc.abstractmethod
    async def funnel(self, project_id: int, window: Window, filters: Filters, steps: list[tuple[str, str | None]],
                     names: list[str], window_ms: int, breakdown: str | None, limit: int
                     ) -> tuple[list[FunnelStep], list[FunnelGroup] | None]:
        """Persons per step ((event, path or None) each, shown as `names`): a person reaches step k when one of
        their first-step events in the window is followed, in time order, by steps 2 … k, each no later than
        `window_ms` after that first step, all in the window and matching the filters. With `breakdown`
        (browser, os, device, referrer, utm_source, country, language, screen, prop.KEY, trait.KEY) also per
        value of the first-step event, at most `limit` values."""

    @abc.abstractmethod
    async def retention(self, project_id: int, edges: list[int], cohorts: int, periods: int,
                        start_event: str | None, return_event: str | None, filters: Filters, now_ms: int
                        ) -> list[CohortCounts]:
        """Per cohort period [edges[c], edges[c + 1]), c < `cohorts`: the persons whose first `start_event` ever
        (None: any event) falls in it, and of them those with a `return_event` in the cohort's period and each
        of the `periods` - 1 after it that have begun by `now_ms`; only events matching the filters count."""

    @abc.abstractmethod
    async def paths(self, project_id: int, window: Window, filters: Filters, start: tuple[str, str | None],
                    label: str, depth: int, limit: int) -> PathNode:
        """The steps sessions took after `start` in the window (matching the filters), as a tree `depth` steps
        deep with the `limit` most taken next steps of each."""

    @abc.abstractmethod
    def stop_reads(self) -> None:
        """Stop the read questions running or waiting now (at shutdown): each raises ReadStopped."""

    async def warm_up(self, days: int) -> None:
        """Compute what the first dashboards opened will ask (a store without caches does nothing)."""

    # -- maintenance ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def verify(self, chosen: list[Project] | None = None) -> list[Difference]:
        """Recount every aggregate from the raw events; the differences (none: all agree)."""

    @abc.abstractmethod
    async def prune(self, now_ms: int) -> dict[str, int]:
        """Delete raw events past each project's retention; events deleted per project name."""

    @abc.abstractmethod
    async def backup(self, destination: Path) -> tuple[Path, int]:
        """An online, consistent copy at `destination` (a file, or a directory to put one in); the file written
        and its size."""

    @abc.abstractmethod
    async def export(self, project_id: int, start_ms: int, end_ms: int, fmt: str, out: TextIO) -> int:
        """Stream the raw events of the window as csv or jsonl; how many were written."""

    @abc.abstractmethod
    async def size_bytes(self) -> int: ...

    @abc.abstractmethod
    async def events_since(self, project_id: int, start_ms: int) -> int: ...


# the store open_store picks, as "module:class", imported when a store is opened: stores import the seam, and
# the seam imports no store
DEFAULT_STORE = "pulse.storage.sqlite.store:SQLiteStore"
# by the scheme of `settings.store`
STORES = {"clickhouse": "pulse.storage.clickhouse.store:ClickHouseStore",
          "chdb": "pulse.storage.clickhouse.store:ClickHouseStore"}


def open_store(settings: Settings, *, serve: bool = True,
               on_commit: Callable[[list[CommittedEvent]], None] | None = None,
               wants: Callable[[int], bool] | None = None) -> Store:
    """The store the settings name (`store`, a URL): by default the SQLite database in the data directory,
    `clickhouse://…` or `chdb://…` the ClickHouse store. `on_commit` gets every committed batch of the projects
    `wants` accepts, on the event loop (the live feed)."""
    chosen = DEFAULT_STORE
    if settings.store:
        scheme = settings.store.partition("://")[0]
        if scheme not in STORES:
            raise ValueError(f"store: expected clickhouse://HOST:PORT/DB or chdb://PATH, got {settings.store!r}")
        chosen = STORES[scheme]
    module, _, name = chosen.partition(":")
    implementation: type[Store] = getattr(importlib.import_module(module), name)
    return implementation(settings, serve=serve, on_commit=on_commit, wants=wants)
