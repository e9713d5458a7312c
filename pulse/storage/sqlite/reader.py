"""Read-only connections, one per worker thread, each query under a time limit and stoppable.

A read ends at its deadline wherever it is: the SQL progress handler stops a statement, and the
Python loops of the read path call `checkpoint()` between their pieces of work. A read whose caller
goes away (its task is cancelled: the client disconnected, the server is shutting down) is stopped
the same way, its running statement interrupted, so it never holds a thread for nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import apsw

from pulse.storage.model import QueryTimeout, ReadStopped
from pulse.storage.sqlite.columns import ColumnIndex
from pulse.storage.sqlite.connection import _current, connect, set_deadline
from pulse.storage.sqlite.day_cache import DayCache, Snapshot

T = TypeVar("T")


class _Call:
    """One read on a reader thread: its deadline, whether it was stopped, the connection it runs on."""

    def __init__(self, timeout_s: float, stoppable: bool) -> None:
        self.timeout_s = timeout_s
        self.stoppable = stoppable
        self.deadline = float("inf")  # set when a thread takes it up: the wait for a thread does not count
        self.stopped = False
        self.conn: apsw.Connection | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.stopped:
            raise ReadStopped("the read was stopped: nobody waits for it any more")
        if time.monotonic() > self.deadline:
            raise QueryTimeout(f"query took longer than {self.timeout_s:g}s")

    def stop(self) -> None:
        """From any thread: checkpoints raise from now on, and the statement running now is interrupted."""
        with self._lock:
            self.stopped = True
            if self.conn is not None:
                self.conn.interrupt()

    @contextmanager
    def running_on(self, conn: apsw.Connection) -> Iterator[None]:
        with self._lock:
            self.conn = conn
        try:
            yield
        finally:
            with self._lock:  # no interrupt can reach the connection's next call
                self.conn = None


class Reader:
    def __init__(self, path: Path, *, threads: int = 2, timeout_s: float = 10.0,
                 settle: Callable[[], Awaitable[None]] | None = None, cache_mib: int = 96,
                 columns: ColumnIndex | None = None) -> None:
        self.path = path
        self.columns = columns  # the event columns, built by the server beside the writer
        self.days = DayCache(cache_mib * 1024 * 1024)  # shared by the reader threads
        self.settle = settle  # waits until what the writer acknowledged is all in the tables
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._connections: list[apsw.Connection] = []
        self._calls: set[_Call] = set()  # asked for and not yet answered
        self._stopping = False  # stop() was called: stoppable reads are refused
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pulse-reader")

    def _connection(self) -> apsw.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop_connection(self, conn: apsw.Connection) -> None:
        """Close this thread's connection: after an interrupt SQLite keeps refusing statements until every
        statement of the connection is reset, which cursors still held by the stopped read's frames are not."""
        self._local.conn = None
        with self._lock:
            self._connections.remove(conn)
        conn.close(True)

    def _call(self, call: _Call, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        call.check()  # stopped while it waited for a thread
        call.deadline = time.monotonic() + call.timeout_s
        conn = self._connection()
        set_deadline(conn, call.timeout_s, lambda: call.stopped)
        conn.execute("BEGIN")  # one snapshot for every statement of the call
        _current.call = call
        try:
            with call.running_on(conn):
                return fn(Snapshot(conn, self.days, self.columns), *args)
        except apsw.InterruptError:
            call.check()  # stopped (ReadStopped), or past the deadline
            raise QueryTimeout(f"query took longer than {self.timeout_s:g}s") from None
        finally:
            _current.call = None
            if call.stopped:
                self._drop_connection(conn)
            else:
                conn.execute("COMMIT")
                set_deadline(conn, None)

    async def run(self, fn: Callable[..., T], *args: Any, stoppable: bool = False) -> T:
        """Run fn(Snapshot(connection, day cache), *args) on a reader thread inside one read transaction.

        Cancelling the caller stops the read: a read still waiting for a thread never starts, a running one is
        interrupted. A `stoppable` read is also stopped by `stop()`, and refused once it was called.
        """
        call = _Call(self.timeout_s, stoppable)
        with self._lock:
            if stoppable and self._stopping:
                raise ReadStopped("the server is shutting down")
            self._calls.add(call)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, call, fn, args)
        except asyncio.CancelledError:
            call.stop()
            task = asyncio.current_task()
            if task is not None and not task.cancelling():  # not ours: close() dropped the queued read
                raise ReadStopped("the read was stopped: the readers are closing") from None
            raise
        finally:
            with self._lock:
                self._calls.discard(call)

    async def fresh(self, fn: Callable[..., T], *args: Any, stoppable: bool = False) -> T:
        """Like run, after every event acknowledged so far counts in the rollups, sessions and persons."""
        if self.settle is not None:
            # shielded: a caller that goes away must not cancel the writer's flush under other readers
            await asyncio.shield(self.settle())
        return await self.run(fn, *args, stoppable=stoppable)

    def stop(self) -> None:
        """Stop every stoppable read running or waiting now (the requests' reads, at shutdown: none may hold up
        the exit), and refuse those asked for later; each raises ReadStopped to its caller. Reads that are not
        stoppable (the warm-up, the keyring) run as usual."""
        with self._lock:
            self._stopping = True
            calls = [call for call in self._calls if call.stoppable]
        for call in calls:
            call.stop()

    async def close(self) -> None:
        """Stop every read still running (interrupting its connection) or waiting, then close the connections."""
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.stop()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
