"""Connection setup in one place: WAL, busy timeout, pragmas, read-only readers with a time limit."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw

from pulse.files import FILE_MODE

BUSY_TIMEOUT_MS = 5000
# the database holds every project's events: its owner's alone (FILE_MODE). SQLite gives the -wal and -shm
# files the database file's mode, so a database made with that mode keeps all three private

log = logging.getLogger("pulse.storage")


def connect(path: Path | str, *, readonly: bool = False, synchronous: str = "FULL") -> apsw.Connection:
    """Open the database. Writers get WAL and the chosen durability; readers are read-only."""
    if readonly:
        flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
    else:
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI
        create_private(path)
    conn = apsw.Connection(str(path), flags=flags, statementcachesize=128)
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    conn.pragma("foreign_keys", True)
    conn.pragma("temp_store", "MEMORY")
    # KiB of pages: a writer keeps the tails of its tables and indexes hot (8 MiB wrote 1.5M events as
    # fast as 16 or 32 MiB did); readers mostly read the day cache (queries.DAYS)
    conn.pragma("cache_size", -8_000)
    if not readonly:
        conn.pragma("journal_mode", "wal")
        conn.pragma("synchronous", synchronous.upper())
        conn.pragma("journal_size_limit", 64 * 1024 * 1024)
    return conn


def create_private(path: Path | str) -> None:
    """Make a missing database file empty with FILE_MODE (SQLite would use the umask's mode, 0644 as a rule).

    An existing file is not opened: closing a descriptor of a database file drops every POSIX lock this
    process holds on it, the locks of its open SQLite connections too.
    """
    if not os.path.exists(path):
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))


@contextlib.contextmanager
def immediate(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """A write transaction that takes the write lock at BEGIN, waiting up to the busy timeout.

    A deferred transaction that reads and then writes fails at once (SQLITE_BUSY_SNAPSHOT) when the
    server's writer commits in between; taking the lock first makes it wait its turn instead.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def set_deadline(conn: apsw.Connection, seconds: float | None, stopped: Callable[[], bool] | None = None) -> None:
    """Interrupt any statement on this connection that runs past `seconds` from now, or once `stopped()`.

    `stopped` is asked by the progress handler itself: an interrupt (`Connection.interrupt`) that lands between
    two statements is forgotten by SQLite when the next one starts, the handler's answer never is.
    """
    if seconds is None:
        conn.set_progress_handler(None)
        return
    deadline = time.monotonic() + seconds

    def check() -> bool:  # True aborts the statement
        return time.monotonic() > deadline or (stopped is not None and stopped())

    conn.set_progress_handler(check, 10_000)


_current = threading.local()  # .call: the read this thread runs (set by Reader)


def checkpoint() -> None:
    """Raise QueryTimeout if this thread's read is past its deadline, ReadStopped if it was stopped.

    The progress handler only runs inside SQLite; long Python loops of the read path call this between
    pieces of work. Outside a Reader's call (the CLI, tests) it does nothing.
    """
    call = getattr(_current, "call", None)
    if call is not None:
        call.check()
