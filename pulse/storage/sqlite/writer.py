"""The single writer, seen from the server: a bounded queue of ingest jobs and futures resolved at commit.

The writing itself happens in one child process (`writer_process`), which owns the only write
connection. It has an interpreter of its own, so the event loop and the writer never wait for each
other's GIL, and a server killed with SIGKILL does not interrupt a commit: the writer notices the
closed socket, commits what it has and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pulse.storage.model import (
    CommittedEvent, IngestJob, ProjectGone, QueueFull, WriteFailed, WriterClosed, WriterStalled,
)
from pulse.storage.sqlite.rows import DISTINCT_ID, NAME, PATH, PROPS, TS, prepare
from pulse.storage.sqlite.wire import (
    PROJECT_GONE, Committed, Failed, Flush, Ready, Shutdown, StartFailed, Submit, decode_from_writer, frame,
    read_frames,
)

log = logging.getLogger(__name__)

COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10000)
RESTART_DELAY_S = 0.5


class WriterStartFailed(Exception):
    """The writer process could not open or migrate the database."""


@dataclass(slots=True)
class WriterStats:
    queued_events: int = 0
    commits: int = 0
    events_written: int = 0
    duplicates: int = 0
    failures: int = 0
    restarts: int = 0
    stalled_requests: int = 0  # answered WriterStalled: refused, or waited past the write deadline
    last_commit_at: float | None = None  # wall clock seconds
    last_batch_events: int = 0
    last_commit_seconds: float = 0.0
    commit_latency_counts: list[int] = field(default_factory=lambda: [0] * (len(COMMIT_BUCKETS) + 1))
    commit_latency_sum: float = 0.0
    batch_size_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    batch_size_sum: int = 0


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future
    job: IngestJob | None  # None: a Flush
    rows: list[tuple]
    queued_at: float

    @property
    def events(self) -> int:
        return 0 if self.job is None else len(self.job.events)


class EventWriter:
    def __init__(
        self,
        path: Path,
        *,
        max_queued_events: int = 100_000,
        batch_max_events: int = 20_000,
        synchronous: str = "FULL",
        max_db_mb: int = 0,
        write_timeout_s: float = 5.0,
        on_commit: Callable[[list[CommittedEvent]], None] | None = None,
        wants: Callable[[int], bool] | None = None,
    ) -> None:
        self.path = path
        self.max_queued_events = max_queued_events
        self.batch_max_events = batch_max_events
        self.synchronous = synchronous
        self.max_db_mb = max_db_mb
        self.write_timeout_s = write_timeout_s  # a request waits this long for its commit, then gets WriterStalled
        self.on_commit = on_commit  # called on the event loop with every committed batch
        self.wants = wants  # which projects on_commit wants events of (None: all)
        self.stats = WriterStats()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._process: asyncio.subprocess.Process | None = None
        self._stream: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._up = False
        self._closing = False
        self._outbox: list[bytes] = []  # frames written once per event-loop turn, not one syscall each
        self._unwritten = True  # the writer may keep changes in memory (Committed.unwritten; see write_behind)
        self._deadline: asyncio.TimerHandle | None = None  # when the oldest waiting request times out

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer process; it creates and migrates the database. Raises WriterStartFailed."""
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pulse.storage.sqlite.writer_process", str(theirs.fileno()), str(self.path),
                self.synchronous, str(self.batch_max_events), str(self.max_db_mb), pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        reader, self._stream = await asyncio.open_unix_connection(sock=ours, limit=1 << 24)
        first = await self._read_message(reader)
        if not isinstance(first, Ready):
            await self._process.wait()
            raise WriterStartFailed(first.error if isinstance(first, StartFailed) else "writer process exited")
        self._up = True
        self._unwritten = True  # a restarted writer rebuilds the changes a crashed one kept
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="pulse-writer-acks")

    async def close(self) -> None:
        """Take no new work; the writer process writes everything queued, commits and exits."""
        self._closing = True
        if self._up and self._stream is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._stream.write(b"".join(self._outbox) + frame(Shutdown()))
                self._outbox = []
                await self._stream.drain()
        if self._reader_task is not None:
            await self._reader_task
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), timeout=60)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._deadline is not None:
            self._deadline.cancel()
        self._fail_pending(WriterClosed("server is shutting down"))

    @property
    def queued_events(self) -> int:
        return self.stats.queued_events

    @property
    def writer_lag_seconds(self) -> float:
        """How long the oldest request still waiting for its commit has waited."""
        for pending in self._pending.values():
            return time.monotonic() - pending.queued_at
        return 0.0

    @property
    def stalled(self) -> bool:
        """A request has waited for its commit longer than the write deadline."""
        return self.writer_lag_seconds > self.write_timeout_s

    @property
    def state(self) -> str:
        """For /health: ok, stalled (see `stalled`), restarting (after a crash) or stopping."""
        if self._closing:
            return "stopping"
        if not self._up:
            return "restarting"
        return "stalled" if self.stalled else "ok"

    @property
    def wal_bytes(self) -> int:
        """Size of the database's write-ahead log file."""
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- the handler side --------------------------------------------------------------------------

    def enqueue(self, job: IngestJob) -> asyncio.Future:
        """Queue a job; the future resolves to (accepted, duplicates) after its commit, or raises ProjectGone
        (the project was deleted first), or fails with WriterStalled once it has waited write_timeout_s (the job
        stays queued and may still commit)."""
        if self._closing:
            raise WriterClosed("server is shutting down")
        if not self._up or self._stream is None or self._stream.is_closing():
            raise WriterClosed("storage writer is restarting")
        self._refuse_if_stalled()
        count = len(job.events)
        if self.stats.queued_events + count > self.max_queued_events:
            raise QueueFull(retry_after=1)
        rows = prepare(job)
        job_id = next(self._ids)
        submit = Submit(job_id, job.project_id, job.received_ms, job.ip, job.user_agent, rows, job.country)
        future = self._send(job_id, submit, job, rows)
        self.stats.queued_events += count
        return future

    async def submit(self, job: IngestJob) -> tuple[int, int]:
        return await self.enqueue(job)

    async def settle(self) -> None:
        """Wait until every event acknowledged so far counts in the rollups, sessions and persons tables: a
        Flush when the writer keeps changes, none when it keeps nothing; WriterStalled past the write
        deadline (see write_behind)."""
        if not self._unwritten or not self._up or self._closing or self._stream is None or self._stream.is_closing():
            return
        self._refuse_if_stalled()  # what is written is not all that was acknowledged: no exact answer now
        job_id = next(self._ids)
        with contextlib.suppress(WriteFailed, WriterClosed):  # a failed write leaves the kept changes kept
            await self._send(job_id, Flush(job_id), None, [])

    def _refuse_if_stalled(self) -> None:
        """New work waits behind a request already past its deadline: refuse it now rather than later."""
        if self.stalled:
            self.stats.stalled_requests += 1
            raise WriterStalled(f"storage writer is stalled ({self.writer_lag_seconds:.0f} s behind); retry later",
                                self._retry_after)

    @property
    def _retry_after(self) -> int:
        return max(1, math.ceil(self.write_timeout_s))

    def _expire(self) -> None:
        """Fail every request waiting longer than the write deadline with WriterStalled; its job stays
        queued (the writer may still commit it: the client's retry is de-duplicated by uuid)."""
        self._deadline = None
        now = time.monotonic()
        for item in self._pending.values():  # oldest first
            left = item.queued_at + self.write_timeout_s - now
            if left > 0:
                self._deadline = asyncio.get_running_loop().call_later(left, self._expire)
                return
            if not item.future.done():
                self.stats.stalled_requests += 1
                item.future.set_exception(WriterStalled(
                    f"storage writer did not commit within {self.write_timeout_s:g} s; the batch may still be"
                    " stored: retry it (events with a uuid are stored once)", self._retry_after))
                item.future.exception()  # retrieved: the handler may be gone

    def _send(self, job_id: int, message: Submit | Flush, job: IngestJob | None, rows: list[tuple]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(frame(message))
        future = loop.create_future()
        self._pending[job_id] = _Pending(future, job, rows, time.monotonic())
        if self._deadline is None:
            self._deadline = loop.call_later(self.write_timeout_s, self._expire)
        return future

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        try:
            self._stream.write(b"".join(frames))
        except (ConnectionError, RuntimeError):  # the writer process just died; the ack loop restarts it
            self._up = False

    # -- answers from the writer process -----------------------------------------------------------

    async def _read_message(self, reader: asyncio.StreamReader):
        try:
            header = await reader.readexactly(4)
            payload = await reader.readexactly(int.from_bytes(header, "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return decode_from_writer(payload)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        buffer = bytearray()
        while True:
            try:
                chunk = await reader.read(1 << 20)
            except ConnectionError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            for payload in read_frames(buffer):
                message = decode_from_writer(payload)
                if isinstance(message, Committed):
                    self._committed(message)
                elif isinstance(message, Failed):
                    self._failed(message)
                # Stopped: everything was written; the end of the stream follows
        self._up = False
        if self._stream is not None:
            self._stream.close()
        if not self._closing:
            await self._crashed()

    async def _crashed(self) -> None:
        code = await self._process.wait() if self._process is not None else None
        log.error("writer process exited unexpectedly (code %s); restarting", code)
        self._fail_pending(WriteFailed("storage writer stopped; nothing of this batch was stored"))
        self.stats.restarts += 1
        while not self._closing:
            await asyncio.sleep(RESTART_DELAY_S)
            try:
                await self.start()
                return
            except Exception:
                log.exception("restarting the writer process failed")

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for item in pending.values():
            self.stats.queued_events -= item.events
            if not item.future.done():
                item.future.set_exception(error)
                item.future.exception()  # retrieved: the handler may be gone

    def _committed(self, message: Committed) -> None:
        stats = self.stats
        self._unwritten = message.unwritten
        stats.commits += 1
        stats.last_commit_at = time.time()
        stats.last_batch_events = message.events
        stats.last_commit_seconds = message.seconds
        stats.commit_latency_counts[_bucket(COMMIT_BUCKETS, message.seconds)] += 1
        stats.commit_latency_sum += message.seconds
        stats.batch_size_counts[_bucket(BATCH_BUCKETS, message.events)] += 1
        stats.batch_size_sum += message.events
        live: list[CommittedEvent] = []
        for job_id, accepted, duplicates in message.results:
            item = self._pending.pop(job_id, None)
            if item is None:
                continue
            if item.job is None:  # a Flush
                if not item.future.done():  # done: the read gave up at the write deadline
                    item.future.set_result((0, 0))
                continue
            stats.queued_events -= len(item.job.events)
            if accepted == PROJECT_GONE:
                if not item.future.done():
                    item.future.set_exception(ProjectGone("the project was deleted"))
                    item.future.exception()
                continue
            stats.events_written += accepted
            stats.duplicates += len(duplicates)
            if not item.future.done():
                item.future.set_result((accepted, len(duplicates)))
            if self.on_commit is not None and (self.wants is None or self.wants(item.job.project_id)):
                skip = set(duplicates)
                live.extend(
                    CommittedEvent(item.job.project_id, row[TS], row[NAME], row[DISTINCT_ID], row[PATH],
                                   row[PROPS], item.job.user_agent)
                    for position, row in enumerate(item.rows) if position not in skip
                )
        if live:
            try:
                self.on_commit(live)
            except Exception:  # the live feed must never break ingest
                log.exception("on_commit callback failed")

    def _failed(self, message: Failed) -> None:
        self.stats.failures += 1
        error = WriteFailed(message.error)
        for job_id in message.job_ids:
            item = self._pending.pop(job_id, None)
            if item is None:
                continue
            self.stats.queued_events -= item.events
            if not item.future.done():
                item.future.set_exception(error)
                item.future.exception()
