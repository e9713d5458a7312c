"""Read-only connections, one per worker thread, each query under a time limit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import apsw

from pulse.storage.connection import QueryTimeout, connect, set_deadline
from pulse.storage.sqlite.day_cache import DayCache, Snapshot

T = TypeVar("T")


class Reader:
    def __init__(self, path: Path, *, threads: int = 2, timeout_s: float = 10.0,
                 settle: Callable[[], Awaitable[None]] | None = None, cache_mib: int = 96) -> None:
        self.path = path
        self.days = DayCache(cache_mib * 1024 * 1024)  # shared by the reader threads
        self.settle = settle  # waits until what the writer acknowledged is all in the tables
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._connections: list[apsw.Connection] = []
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

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._connection()
        set_deadline(conn, self.timeout_s)
        conn.execute("BEGIN")  # one snapshot for every statement of the call
        try:
            return fn(Snapshot(conn, self.days), *args)
        except apsw.InterruptError:
            raise QueryTimeout(f"query took longer than {self.timeout_s:g}s") from None
        finally:
            conn.execute("COMMIT")
            set_deadline(conn, None)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(Snapshot(connection, day cache), *args) on a reader thread inside one read transaction."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn, args)

    async def fresh(self, fn: Callable[..., T], *args: Any) -> T:
        """Like run, after every event acknowledged so far counts in the rollups, sessions and persons."""
        if self.settle is not None:
            await self.settle()
        return await self.run(fn, *args)

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
