"""The single writer's process: owns the only write connection; one transaction per group commit.

Started by EventWriter as `python -m pulse.storage.sqlite.writer_process FD DB SYNCHRONOUS BATCH_MAX`, with one end
of a socketpair as FD. It reads Submit frames, takes every one waiting (up to BATCH_MAX events), writes
them and any new sessions and persons in one transaction, commits, then answers with one Committed
frame. What they add to rollups, sessions and persons may be written by a later commit; a Flush frame
asks for it now (see write_behind). Between commits it keeps the WAL bounded (WalBound). It
stops after a Shutdown frame, or when the server's end closes (the server died): either way it first
writes and commits everything it has received and kept.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

import apsw

from pulse.enrich import load_agent_rules
from pulse.storage.sqlite.applier import BatchApplier
from pulse.storage.sqlite.connection import BUSY_TIMEOUT_MS, connect
from pulse.storage.sqlite.schema import migrate
from pulse.storage.sqlite.wire import (
    Committed, Failed, Flush, Ready, Shutdown, StartFailed, Stopped, Submit, decode_to_writer, frame, read_frames,
)
from pulse.storage.sqlite.write_behind import FLUSH_IDLE_S

log = logging.getLogger("pulse.writer")

BUSY_RETRIES = 5
READ_SIZE = 1 << 20
# Group commit: with fewer events than COMMIT_WINDOW_EVENTS waiting, keep reading while requests keep
# arriving (gaps under COMMIT_GAP_S), for at most COMMIT_WINDOW_S. Requests woken by the last commit
# then share the next one instead of each paying for a commit of its own (WAL frames and an fsync).
COMMIT_WINDOW_EVENTS = 256
COMMIT_WINDOW_S = 0.002
COMMIT_GAP_S = 0.0003
# The WAL is restarted once it holds WAL_RESET_BYTES (see WalBound): the -wal file stays about that size
# under any sustained load, and never past journal_size_limit (64 MiB) for longer than a slow reader
# holds its snapshot. A RESTART checkpoint waits at most CHECKPOINT_WAIT_MS for readers; one that could
# not finish is retried after CHECKPOINT_RETRY_S, then twice as long each time, up to
# CHECKPOINT_BACKOFF_MAX_S (the passive checkpoints back off the same way on a full disk).
WAL_RESET_BYTES = 32 * 1024 * 1024
# KiB of pages the writer's connection keeps (pages are read only as they are touched): a busy site's
# sessions and persons rows (~100 bytes each), updated all over their tables by every flush, stay in memory
# rather than being read again from the file each time (8 MiB held 2,000 open sessions' tails but not 200,000)
WRITER_CACHE_KIB = 96 * 1024
CHECKPOINT_WAIT_MS = 100
CHECKPOINT_RETRY_S = 0.25
CHECKPOINT_BACKOFF_MAX_S = 4.0


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.closed = False
        # read into one buffer made once: a recv() of READ_SIZE allocates (and maps) that much each call
        self.scratch = memoryview(bytearray(READ_SIZE))

    def send(self, message: object) -> None:
        """Send unless the server's end is gone (then the writer finishes its work and exits)."""
        if self.closed:
            return
        try:
            self.sock.sendall(frame(message))
        except OSError:
            self.closed = True

    def receive(self, block: bool, timeout: float = 0.0) -> list:
        """Every message that has arrived; waits for the first one if `block`, else up to `timeout`."""
        messages: list = []
        wait = block
        while not self.closed:
            if not wait:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    break
            timeout = 0.0  # only the first wait may be long: then take what else has arrived, and go
            size = self.sock.recv_into(self.scratch)
            if not size:
                self.closed = True
                break
            self.buffer += self.scratch[:size]
            messages.extend(decode_to_writer(payload) for payload in read_frames(self.buffer))
            wait = block and not messages
        return messages


def write(conn: apsw.Connection, applier: BatchApplier, jobs: list[Submit | Flush], flush: bool,
          waiting: list[tuple[int, int]]) -> Committed | Failed:
    """One commit of the jobs. A Flush is answered by the first commit after which every change of the events
    stored before it was taken is written (see write_behind): `waiting` holds those not answered yet, as (job
    id, the last event stored when it was taken); while any waits, each commit writes what is kept faster."""
    started = time.perf_counter()
    error: BaseException | None = None
    submits = [job for job in jobs if isinstance(job, Submit)]
    waiting.extend((job.job_id, applier.last_event) for job in jobs if isinstance(job, Flush))
    flush = flush or (bool(waiting) and not submits)  # no request waits on this commit: write it all
    for attempt in range(BUSY_RETRIES):
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = applier.apply(submits, flush=flush, drain=bool(waiting))
                conn.execute("COMMIT")
            except BaseException:
                if not conn.getautocommit():
                    conn.execute("ROLLBACK")
                applier.reset()
                raise
            # nothing kept: every event there is counts (those a deleted project took are gone, ids and all)
            through = applier.written_through if applier.unwritten > 0 else sys.maxsize
            answered = [(job_id, 0, []) for job_id, target in waiting if target <= through]
            waiting[:] = [(job_id, target) for job_id, target in waiting if target > through]
            return Committed(results + answered, time.perf_counter() - started, sum(len(j.events) for j in submits),
                             applier.unwritten > 0)
        except apsw.BusyError as exc:  # another process holds the write lock past the busy timeout
            error = exc
            log.warning("database busy (attempt %d of %d)", attempt + 1, BUSY_RETRIES)
        except Exception as exc:  # disk full, read-only file, corruption: fail these requests, go on
            log.error("write of %d jobs failed: %s", len(jobs), exc)
            error = exc
            break
    failed = [job.job_id for job in submits] + [job_id for job_id, _ in waiting]  # a read goes on with what is written
    waiting.clear()
    return Failed(failed, f"storage error: {error}")


class Checkpointer(threading.Thread):
    """Copies the WAL back into the database from a connection of its own, off the commit path.

    SQLite would otherwise do it inside a commit every 1000 pages. A passive checkpoint never blocks
    the writer; SQLite releases the GIL while it runs, so it overlaps the writer's own work. It cannot
    reset the WAL while commits keep coming (WalBound does that). A full disk or an I/O error is logged
    once and retried, less often the longer it lasts, until space returns.
    """

    def __init__(self, path: str, lock: threading.Lock, every_s: float = 0.2) -> None:
        super().__init__(name="pulse-checkpoint", daemon=True)
        self.path, self.lock, self.every_s = path, lock, every_s
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = connect(self.path)
        wait, failing = self.every_s, False
        try:
            while not self.stopping.wait(wait):
                try:
                    with self.lock:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except apsw.BusyError:
                    continue
                except apsw.Error as exc:  # a full disk, an I/O error: keep trying, it may come back
                    if not failing:
                        log.error("checkpoint failed: %s; retrying until it succeeds", exc)
                    wait, failing = min(wait * 2, CHECKPOINT_BACKOFF_MAX_S), True
                    continue
                if failing:
                    log.info("checkpoints succeed again")
                wait, failing = self.every_s, False
        finally:
            conn.close()


class WalBound:
    """Keeps the WAL near WAL_RESET_BYTES under any sustained load: past it, the writer itself runs a
    RESTART checkpoint between two commits, so the next commit writes the WAL from its start again.

    Passive checkpoints copy the WAL into the database while commits go on, but the WAL restarts only
    when a transaction begins with every frame copied and no reader inside it; under steady load that
    never happens and the file grows without end. A RESTART checkpoint holds off commits (none can come:
    the writer is running it) and waits, at most CHECKPOINT_WAIT_MS, for readers of older frames, which
    hold their snapshot for one query. When readers keep it from finishing (a long query, a `pulse
    backup`) the writer tries again later, waiting longer each time, and the WAL grows until then;
    journal_size_limit cuts the file back once it has restarted. When it fails (a full disk) it is tried
    again once the WAL has grown by an eighth of the bound: commits succeed again only when space has
    returned, and then the WAL must restart before it fills the disk anew.
    """

    def __init__(self, conn: apsw.Connection, lock: threading.Lock) -> None:
        self.conn, self.lock = conn, lock
        self.frames = 0  # in the WAL after the last commit
        self.limit = WAL_RESET_BYTES // conn.pragma("page_size")
        self.retry_at, self.backoff, self.failing = 0.0, CHECKPOINT_RETRY_S, False
        self.retry_frames = sys.maxsize  # after a failure: try again at this many frames even before retry_at
        conn.set_wal_hook(self._committed)

    def _committed(self, conn: apsw.Connection, name: str, frames: int) -> int:
        self.frames = frames
        return apsw.SQLITE_OK

    def check(self) -> None:
        """Restart the WAL if it is past its bound; between transactions only."""
        if self.frames < self.limit or (time.monotonic() < self.retry_at and self.frames < self.retry_frames):
            return
        busy, error = True, None
        if self.lock.acquire(timeout=CHECKPOINT_WAIT_MS / 1000):  # a passive checkpoint may be running
            self.conn.set_busy_timeout(CHECKPOINT_WAIT_MS)
            try:
                busy = self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()[0][0] != 0
            except apsw.BusyError:
                pass
            except apsw.Error as exc:  # a full disk, an I/O error
                error = exc
            finally:
                self.conn.set_busy_timeout(BUSY_TIMEOUT_MS)
                self.lock.release()
        if not busy and error is None:
            self.frames, self.backoff, self.retry_at = 0, CHECKPOINT_RETRY_S, 0.0
            if self.failing:
                log.info("the WAL restarts again")
            self.failing = False
            return
        if error is not None and not self.failing:
            log.error("restarting the WAL failed: %s; retrying until it succeeds", error)
        self.failing = self.failing or error is not None
        self.retry_at = time.monotonic() + self.backoff
        self.retry_frames = self.frames + self.limit // 8 if error is not None else sys.maxsize
        self.backoff = min(self.backoff * 2, CHECKPOINT_BACKOFF_MAX_S)


def serve(channel: Channel, conn: apsw.Connection, applier: BatchApplier, batch_max: int, wal: WalBound) -> None:
    pending: list[Submit | Flush] = []
    waiting: list[tuple[int, int]] = []  # Flush frames not answered yet (see write)
    stopping = False
    quiet_flush_at = 0.0  # after a failed write (a full disk), the next quiet flush waits a second
    while True:
        idle = not pending and not stopping
        kept = applier.unwritten > 0 or bool(waiting)
        now = time.monotonic()
        may_flush = kept and now >= quiet_flush_at
        # idle with something kept: wait at most until it may be written (a read may be waiting for it)
        wait = (FLUSH_IDLE_S if may_flush else min(1.0, quiet_flush_at - now)) if idle and kept else 0.0
        arrived = channel.receive(block=idle and not kept, timeout=wait)
        for message in arrived:
            if isinstance(message, Shutdown):
                stopping = True
            else:
                pending.append(message)
        if channel.closed:
            stopping = True
        if idle and not arrived and may_flush and not channel.closed:  # idle: write what is kept
            outcome = write(conn, applier, [], True, waiting)
            if isinstance(outcome, Failed):
                quiet_flush_at = time.monotonic() + 1.0
            channel.send(outcome)
            wal.check()
            continue
        if pending and not stopping:
            deadline = time.monotonic() + COMMIT_WINDOW_S
            while sum(len(job.events) for job in pending) < COMMIT_WINDOW_EVENTS and time.monotonic() < deadline:
                arrived = channel.receive(block=False, timeout=COMMIT_GAP_S)
                if not arrived:
                    break
                for message in arrived:
                    if isinstance(message, Shutdown):
                        stopping = True
                    else:
                        pending.append(message)
        if pending:
            taken, events = 0, 0
            while taken < len(pending) and (taken == 0 or events + len(pending[taken].events) <= batch_max):
                events += len(pending[taken].events)
                taken += 1
            jobs, pending = pending[:taken], pending[taken:]
            channel.send(write(conn, applier, jobs, stopping, waiting))
            wal.check()  # after the answer: the requests of this commit do not wait for it
        elif stopping:
            if applier.unwritten or waiting:
                answers = bool(waiting)  # reads still wait: the last commit answers them
                outcome = write(conn, applier, [], True, waiting)
                if answers:
                    channel.send(outcome)
            channel.send(Stopped())
            return


def main(argv: list[str]) -> int:
    fd, path, synchronous, batch_max = int(argv[0]), argv[1], argv[2], int(argv[3])
    max_db_mb = int(argv[4]) if len(argv) > 4 else 0
    # the server coordinates shutdown: Ctrl-C in a terminal must not kill the writer mid-drain
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="pulse writer: %(message)s")
    channel = Channel(socket.socket(fileno=fd))
    try:
        conn = connect(path, synchronous=synchronous)
        migrate(conn)
        conn.pragma("wal_autocheckpoint", 0)  # the Checkpointer does it
        conn.pragma("cache_size", -WRITER_CACHE_KIB)
        if max_db_mb:  # a quota: past it, writes fail as on a full disk (503s) until space is freed
            conn.pragma("max_page_count", max_db_mb * 1_048_576 // conn.pragma("page_size"))
        applier = BatchApplier(conn)
        load_agent_rules()  # before Ready: the first request should not wait for it
    except Exception as exc:
        channel.send(StartFailed(str(exc)))
        return 1
    # what start-up made lives for the whole run; decoded batches are short-lived and cycle-free, so
    # collections are made rare (they rescanned the id caches many times a second)
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    channel.send(Ready(os.getpid()))
    lock = threading.Lock()  # one checkpoint at a time: a second would fail at once, not wait
    checkpointer = Checkpointer(path, lock)
    checkpointer.start()
    try:
        serve(channel, conn, applier, batch_max, WalBound(conn, lock))
    finally:
        checkpointer.stopping.set()
        checkpointer.join()
        with contextlib.suppress(apsw.Error):  # on a full disk the WAL stays; the next start reads it
            conn.pragma("optimize")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
