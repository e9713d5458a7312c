"""The SQLite store: one database file in the data directory, the default.

Serving, it owns the single writer (a child process that owns the only write connection, `writer`) and the
readers (read-only connections in a thread pool, each with a day cache, `reader`). Catalog changes and
maintenance that write (projects, keys, prune) use a short-lived connection of their own, as the CLI always has:
SQLite's write lock puts them between the writer's commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

import apsw

from pulse.config import Settings
from pulse.storage.base import Store
from pulse.storage.model import (
    Catalog, CommittedEvent, Cursor, Difference, Filters, Histogram, IngestJob, IngestStats, Project, Window,
    StoreInUse, WriterStalled,
)
from pulse.storage.sqlite import (
    breakdowns, funnels, goals, lists, maintenance, paths, periods, projects, retention, shares,
)
from pulse.files import FILE_MODE, make_private
from pulse.storage.sqlite.columns import ColumnIndex
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.reader import Reader
from pulse.storage.sqlite.schema import migrate
from pulse.storage.sqlite.warmup import warm
from pulse.storage.sqlite.writer import BATCH_BUCKETS, COMMIT_BUCKETS, EventWriter

T = TypeVar("T")


def _catalog(snap) -> Catalog:
    return Catalog(projects.catalog_version(snap.conn),
                   {**projects.load_grants(snap.conn), **shares.load_grants(snap.conn)},
                   {p.id: p for p in projects.list_projects(snap.conn)})


def _version(snap) -> int:
    return projects.catalog_version(snap.conn)


class SQLiteStore(Store):
    def __init__(self, settings: Settings, *, serve: bool = True,
                 on_commit: Callable[[list[CommittedEvent]], None] | None = None,
                 wants: Callable[[int], bool] | None = None) -> None:
        self.settings = settings
        self.path = settings.db_path
        self.serve = serve
        self.on_commit = on_commit
        self.wants = wants
        self.writer: EventWriter | None = None
        self.reader: Reader | None = None
        self.columns: ColumnIndex | None = None

    # -- life cycle -----------------------------------------------------------------------------------

    async def __aenter__(self) -> SQLiteStore:
        settings = self.settings
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        settle = None
        if self.serve:
            self.writer = EventWriter(
                self.path,
                max_queued_events=settings.queue_max_events,
                batch_max_events=settings.write_batch_max_events,
                synchronous=settings.synchronous,
                max_db_mb=settings.max_db_mb,
                write_timeout_s=settings.write_timeout_s,
                on_commit=self.on_commit,
                wants=self.wants,
            )
            await self.writer.start()  # creates and migrates the database
            settle = self._settle
        else:
            await asyncio.to_thread(self._migrate)
        if self.serve and settings.columns:
            self.columns = ColumnIndex(self.path)
            self.columns.start()
        self.reader = Reader(self.path, threads=settings.reader_threads, timeout_s=settings.query_timeout_s,
                             settle=settle, cache_mib=settings.cache_mib, columns=self.columns)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            await self.writer.close()
        if self.columns is not None:
            await asyncio.to_thread(self.columns.stop)
        if self.reader is not None:
            await self.reader.close()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The database file itself is locked (found through symlinks): a second server whose data directory
        leads to the same database by a link is refused rather than writing beside the first. flock does not
        touch SQLite's locks (POSIX record locks); the descriptor is closed only when the context is left, once
        the server has closed its own connections, as closing it drops every POSIX lock this process holds on
        the file."""
        database = self.path.resolve()
        handle = os.open(database, os.O_RDONLY | os.O_CREAT, FILE_MODE)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreInUse(f"another pulse server is using the database {database}") from None
            for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
                make_private(path)
            yield
        finally:
            os.close(handle)

    async def _settle(self) -> None:
        """A read waits for the writer to write what it keeps at most the write deadline."""
        try:
            await self.writer.settle()
        except WriterStalled as exc:
            raise WriterStalled(f"storage writer is stalled ({self.writer.writer_lag_seconds:.0f} s behind): the"
                                " answer would miss acknowledged events; retry later", exc.retry_after) from None

    def stop_reads(self) -> None:
        self.reader.stop()

    def _migrate(self) -> None:
        with self._connection():
            pass

    @contextlib.contextmanager
    def _connection(self) -> Iterator[apsw.Connection]:
        """A write connection for one catalog change or maintenance step, on a worker thread."""
        conn = connect(self.path)
        try:
            migrate(conn)
            yield conn
        finally:
            conn.close()

    async def _write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def call() -> T:
            with self._connection() as conn:
                return fn(conn, *args, **kwargs)

        return await asyncio.to_thread(call)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(connection, *args) on a read-only connection of its own, on a worker thread, with no time limit:
        the catalog's small reads, and maintenance that reads the whole database in one transaction of its own."""
        def call() -> T:
            conn = connect(self.path, readonly=True)
            try:
                return fn(conn, *args)
            finally:
                conn.close()

        return await asyncio.to_thread(call)

    # -- ingest ---------------------------------------------------------------------------------------

    def enqueue(self, job: IngestJob) -> asyncio.Future[tuple[int, int]]:
        return self.writer.enqueue(job)

    def ingest_stats(self) -> IngestStats:
        writer = self.writer
        stats = writer.stats
        return IngestStats(
            state=writer.state, queued_events=stats.queued_events, lag_seconds=writer.writer_lag_seconds,
            commits=stats.commits, events_written=stats.events_written, duplicates=stats.duplicates,
            failures=stats.failures, restarts=stats.restarts, stalled_requests=stats.stalled_requests,
            last_commit_at=stats.last_commit_at, last_batch_events=stats.last_batch_events,
            last_commit_seconds=stats.last_commit_seconds,
            commit_seconds=Histogram(COMMIT_BUCKETS, list(stats.commit_latency_counts), stats.commit_latency_sum),
            batch_events=Histogram(BATCH_BUCKETS, list(stats.batch_size_counts), stats.batch_size_sum),
            wal_bytes=writer.wal_bytes,
        )

    # -- the catalog ----------------------------------------------------------------------------------

    async def catalog(self) -> Catalog:
        return await self.reader.run(_catalog)

    async def catalog_version(self) -> int:
        return await self.reader.run(_version)

    async def list_projects(self) -> list[Project]:
        return await self._read(projects.list_projects)

    async def get_project(self, ref: str | int) -> Project:
        return await self._read(projects.get_project, ref)

    async def create_project(self, name: str, *, domain: str | None = None, timezone: str = "UTC",
                             retention_days: int = 180, allowed_origins: str | None = None
                             ) -> tuple[Project, str, str]:
        return await self._write(projects.create_project, name, domain=domain, timezone=timezone,
                                 retention_days=retention_days, allowed_origins=allowed_origins)

    async def update_project(self, project: Project, **changes: Any) -> Project:
        return await self._write(projects.update_project, project, **changes)

    async def delete_project(self, project: Project) -> None:
        await self._write(projects.delete_project, project)

    async def rotate_key(self, project: Project, kind: str, *, grace_seconds: int = 0) -> str:
        return await self._write(projects.rotate_key, project, kind, grace_seconds=grace_seconds)

    async def list_keys(self, project: Project) -> list[dict[str, Any]]:
        return await self._read(projects.list_keys, project)

    async def list_goals(self, project: Project) -> list[dict[str, Any]]:
        return await self._read(goals.list_goals, project)

    async def add_goal(self, project: Project, goal: str) -> dict[str, Any]:
        return await self._write(goals.add_goal, project, goal)

    async def remove_goal(self, project: Project, goal: str) -> None:
        await self._write(goals.remove_goal, project, goal)

    async def create_share(self, project: Project, *, expires_in_s: int | None = None) -> tuple[dict[str, Any], str]:
        return await self._write(shares.create_share, project, expires_in_s=expires_in_s)

    async def list_shares(self, project: Project) -> list[dict[str, Any]]:
        return await self._read(shares.list_shares, project)

    async def revoke_share(self, project: Project, ref: str) -> dict[str, Any]:
        return await self._write(shares.revoke_share, project, ref)

    async def _ask(self, fn: Callable[..., T], *args: Any) -> T:
        """A read question: after the writer has written what it keeps, stopped by stop_reads() or by
        cancelling the caller (its client went away)."""
        return await self.reader.fresh(fn, *args, stoppable=True)

    # -- the read questions ----------------------------------------------------------------------------

    async def project_summary(self, project_id: int, today: Window, hour_bounds: list[int]) -> Any:
        return await self._ask(periods.project_summary, project_id, today, hour_bounds)

    async def overview(self, project_id: int, window: Window, filters: Filters, now_ms: int) -> Any:
        return await self._ask(periods.overview, project_id, window, now_ms, filters)

    async def timeseries(self, project_id: int, bounds: list[int], filters: Filters) -> Any:
        return await self._ask(periods.timeseries, project_id, bounds, filters)

    async def top_events(self, project_id: int, window: Window, filters: Filters, limit: int) -> Any:
        return await self._ask(breakdowns.top_events, project_id, window, filters, limit)

    async def breakdown(self, project_id: int, window: Window, filters: Filters, dimension: str,
                        limit: int) -> Any:
        return await self._ask(breakdowns.breakdown, project_id, window, filters, dimension, limit)

    async def sessions(self, project_id: int, window: Window, filters: Filters, limit: int,
                       cursor: Cursor | None) -> Any:
        return await self._ask(lists.sessions, project_id, window, filters, limit, cursor)

    async def users(self, project_id: int, window: Window, filters: Filters, limit: int,
                    cursor: Cursor | None) -> Any:
        return await self._ask(lists.users, project_id, window, filters, limit, cursor)

    async def events(self, project_id: int, window: Window, filters: Filters, limit: int,
                     cursor: Cursor | None) -> Any:
        return await self._ask(lists.events, project_id, window, filters, limit, cursor)

    async def user_timeline(self, project_id: int, distinct_id: str, window: Window, limit: int,
                            cursor: Cursor | None) -> Any:
        return await self._ask(lists.user_timeline, project_id, distinct_id, window, limit, cursor)

    async def property_keys(self, project_id: int, window: Window, filters: Filters, limit: int) -> Any:
        return await self._ask(breakdowns.property_keys, project_id, window, filters, limit)

    async def property_values(self, project_id: int, window: Window, filters: Filters, key: str,
                              limit: int) -> Any:
        return await self._ask(breakdowns.property_values, project_id, window, filters, key, limit)

    async def trait_keys(self, project_id: int, window: Window, filters: Filters, limit: int) -> Any:
        return await self._ask(breakdowns.trait_keys, project_id, window, filters, limit)

    async def trait_values(self, project_id: int, window: Window, filters: Filters, key: str, limit: int) -> Any:
        return await self._ask(breakdowns.trait_values, project_id, window, filters, key, limit)

    async def goals(self, project_id: int, window: Window, filters: Filters, limit: int) -> Any:
        return await self._ask(goals.goals, project_id, window, filters, limit)

    async def bots(self, project_id: int, window: Window, limit: int) -> Any:
        return await self._ask(breakdowns.bots, project_id, window, limit)

    async def funnel(self, project_id: int, window: Window, filters: Filters, steps: list[tuple[str, str | None]],
                     names: list[str], window_ms: int, breakdown: str | None, limit: int) -> Any:
        return await self._ask(funnels.funnel, project_id, window, filters, steps, names, window_ms, breakdown, limit)

    async def retention(self, project_id: int, edges: list[int], cohorts: int, periods: int,
                        start_event: str | None, return_event: str | None, filters: Filters, now_ms: int) -> Any:
        return await self._ask(retention.retention, project_id, edges, cohorts, periods, start_event, return_event,
                               filters, now_ms)

    async def paths(self, project_id: int, window: Window, filters: Filters, start: tuple[str, str | None],
                    label: str, depth: int, limit: int) -> Any:
        return await self._ask(paths.paths, project_id, window, filters, start, label, depth, limit)

    async def warm_up(self, days: int) -> None:
        await warm(self.reader, days)

    # -- maintenance ----------------------------------------------------------------------------------

    async def verify(self, chosen: list[Project] | None = None) -> list[Difference]:
        return await self._read(maintenance.verify, chosen)

    async def prune(self, now_ms: int) -> dict[str, int]:
        return await self._write(maintenance.prune, now_ms)

    async def backup(self, destination: Path) -> tuple[Path, int]:
        return await asyncio.to_thread(maintenance.backup, self.path, destination)

    async def export(self, project_id: int, start_ms: int, end_ms: int, fmt: str, out: TextIO) -> int:
        return await self._read(maintenance.export, project_id, start_ms, end_ms, fmt, out)

    async def size_bytes(self) -> int:
        return maintenance.database_size(self.path)

    async def events_since(self, project_id: int, start_ms: int) -> int:
        return await self._read(maintenance.events_since, project_id, start_ms)
