"""The single writer: a bounded queue of ingest jobs, one thread, one transaction per group commit.

Handlers call `submit`; the writer thread takes every job waiting (up to a cap), writes them and all
derived rows in one transaction, commits, then resolves every waiting request at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import apsw

from pulse.storage.connection import connect
from pulse.storage.rollups import BatchApplier, CommittedEvent, IngestJob
from pulse.storage.schema import migrate

log = logging.getLogger(__name__)

BUSY_RETRIES = 5


class QueueFull(Exception):
    """The writer's queue cannot take this batch now; the client should retry later."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"ingest queue is full, retry after {retry_after}s")
        self.retry_after = retry_after


class WriterClosed(Exception):
    """The writer is shutting down and takes no new work."""


class WriteFailed(Exception):
    """The transaction holding a batch failed; nothing of the batch was stored."""


@dataclass(slots=True)
class WriterStats:
    queued_events: int = 0
    commits: int = 0
    events_written: int = 0
    duplicates: int = 0
    failures: int = 0
    last_commit_at: float | None = None  # wall clock seconds
    last_batch_events: int = 0
    last_commit_seconds: float = 0.0
    # cumulative histogram of commit latency (seconds); bucket bounds in COMMIT_BUCKETS
    commit_latency_counts: list[int] = field(default_factory=lambda: [0] * (len(COMMIT_BUCKETS) + 1))
    commit_latency_sum: float = 0.0
    batch_size_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    batch_size_sum: int = 0
    oldest_queued_at: float | None = None  # monotonic seconds of the oldest waiting job


COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10000)


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


class EventWriter:
    def __init__(
        self,
        path: Path,
        *,
        max_queued_events: int = 200_000,
        batch_max_events: int = 20_000,
        synchronous: str = "FULL",
        on_commit: Callable[[list[CommittedEvent]], None] | None = None,
    ) -> None:
        self.path = path
        self.max_queued_events = max_queued_events
        self.batch_max_events = batch_max_events
        self.synchronous = synchronous
        self.on_commit = on_commit  # called on the event loop with every committed batch
        self.stats = WriterStats()
        self._jobs: collections.deque[tuple[IngestJob, asyncio.Future, int, float]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="pulse-writer", daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        """Take no new work, write everything queued, commit, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def queued_events(self) -> int:
        return self.stats.queued_events

    # -- the handler side --------------------------------------------------------------------------

    def enqueue(self, job: IngestJob) -> asyncio.Future:
        """Queue a job; the future resolves to (accepted, duplicates) after its commit."""
        count = len(job.events)
        assert self._loop is not None
        future = self._loop.create_future()
        with self._cond:
            if self._closing:
                raise WriterClosed("server is shutting down")
            if self.stats.queued_events + count > self.max_queued_events:
                raise QueueFull(retry_after=1)
            now = time.monotonic()
            self._jobs.append((job, future, count, now))
            if self.stats.oldest_queued_at is None:
                self.stats.oldest_queued_at = now
            self.stats.queued_events += count
            self._cond.notify()
        return future

    async def submit(self, job: IngestJob) -> tuple[int, int]:
        return await self.enqueue(job)

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self, ready: asyncio.Future) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = connect(self.path, synchronous=self.synchronous)
            migrate(conn)
            applier = BatchApplier(conn, live=self.on_commit is not None)
        except BaseException as exc:  # report start-up failures to start()
            loop.call_soon_threadsafe(_settle_ready, ready, exc)
            return
        loop.call_soon_threadsafe(_settle_ready, ready, None)
        try:
            while True:
                taken = self._take()
                if taken is None:
                    break
                self._write(conn, applier, taken)
        finally:
            conn.pragma("optimize")
            conn.close()

    def _take(self) -> list[tuple[IngestJob, asyncio.Future, int, float]] | None:
        with self._cond:
            while not self._jobs and not self._closing:
                self._cond.wait()
            if not self._jobs:
                return None
            taken = []
            events = 0
            while self._jobs and (not taken or events + self._jobs[0][2] <= self.batch_max_events):
                item = self._jobs.popleft()
                taken.append(item)
                events += item[2]
            return taken

    def _write(self, conn: apsw.Connection, applier: BatchApplier, taken: list) -> None:
        jobs = [item[0] for item in taken]
        started = time.perf_counter()
        outcome: list[tuple[int, int]] | BaseException
        committed: list[CommittedEvent] = []
        for attempt in range(BUSY_RETRIES):
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    outcome, committed = applier.apply(jobs)
                    conn.execute("COMMIT")
                except BaseException:
                    if not conn.getautocommit():
                        conn.execute("ROLLBACK")
                    applier.reset()
                    raise
                break
            except apsw.BusyError as exc:
                outcome = exc
                log.warning("database busy (attempt %d of %d)", attempt + 1, BUSY_RETRIES)
            except Exception as exc:  # disk full, read-only file, corruption: fail these requests
                log.error("write of %d jobs failed: %s", len(jobs), exc)
                outcome = exc
                break
        elapsed = time.perf_counter() - started
        count = sum(item[2] for item in taken)
        stats = self.stats
        with self._cond:
            stats.queued_events -= count
            stats.oldest_queued_at = self._jobs[0][3] if self._jobs else None
        if isinstance(outcome, BaseException):
            stats.failures += 1
            error = WriteFailed(f"storage error: {outcome}")
            self._loop.call_soon_threadsafe(_fail_all, taken, error)
            return
        stats.commits += 1
        stats.last_commit_at = time.time()
        stats.last_batch_events = count
        stats.last_commit_seconds = elapsed
        stats.commit_latency_counts[_bucket(COMMIT_BUCKETS, elapsed)] += 1
        stats.commit_latency_sum += elapsed
        stats.batch_size_counts[_bucket(BATCH_BUCKETS, count)] += 1
        stats.batch_size_sum += count
        stats.events_written += sum(accepted for accepted, _ in outcome)
        stats.duplicates += sum(dups for _, dups in outcome)
        self._loop.call_soon_threadsafe(self._resolve_all, taken, outcome, committed)

    def _resolve_all(self, taken: list, outcome: list[tuple[int, int]], committed: list[CommittedEvent]) -> None:
        for (_, future, _, _), result in zip(taken, outcome):
            if not future.done():
                future.set_result(result)
        if self.on_commit is not None and committed:
            try:
                self.on_commit(committed)
            except Exception:  # the live feed must never break ingest
                log.exception("on_commit callback failed")


def _settle_ready(ready: asyncio.Future, exc: BaseException | None) -> None:
    if ready.done():
        return
    if exc is None:
        ready.set_result(None)
    else:
        ready.set_exception(exc)


def _fail_all(taken: list, error: Exception) -> None:
    for _, future, _, _ in taken:
        if not future.done():
            future.set_exception(error)
