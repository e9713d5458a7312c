"""The live feed across nodes: every node sees the events committed by the others within a poll.

A node hands its own commits to `on_commit` as they happen (`store._commit`). So that the nodes sharing a
store see each other's, each commit also writes what the feed needs of its events (name, time, distinct id,
path, properties, user agent) to the `live` table of the node's first ClickHouse server, stamped with the
node's id and the commit's time (`schema.ops_tables`); a failure there is logged and never fails the commit
(the feed may lose events, ingest never waits for it).

While anyone watches a project on this node (`store.wants`), `LivePoller` reads, every POLL_S, the other
nodes' rows of the watched projects stamped after the latest it has seen, less LOOKBACK_MS (a commit is
stamped before its insert returns, so rows may become visible slightly out of stamp order; their uuids tell
the ones already handed on). The first read after nobody watched marks what is there as seen, handing on only
rows stamped within the poll before it: a client gets the events committed after it connected, as on SQLite
(and at most a poll's worth before). The rows are kept for a day and a half at most:
whole days before yesterday are dropped (the table is partitioned by day).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from typing import TYPE_CHECKING

from pulse.storage.clickhouse.schema import EVENT_COLUMNS, LIVE_COLUMNS
from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import CommittedEvent, now_ms

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a node that has watchers reads the other nodes' commits
LOOKBACK_MS = 5_000  # how far before the latest seen stamp each read starts again
PROJECTS_REFRESH_S = 1.0  # how often the list of projects to ask about is read again
EXPIRE_EVERY_S = 3600.0  # how often days of rows before yesterday are dropped
ERROR_LOG_EVERY_S = 60.0  # one warning per this while reads keep failing

_AT = {name: index for index, (name, _) in enumerate(EVENT_COLUMNS)}
_FROM_EVENT = itemgetter(*(_AT[name] for name in ("project_id", "uuid", "ts", "name", "distinct_id", "path", "props")))


class LivePoller:
    """This node's side of the cross-node feed: `record` what it commits, `run` to hand on the others'."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store
        self.node = secrets.token_hex(8)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="pulse-clickhouse-live")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def record(self, event_rows: list[tuple], agents: list[str], committed: int) -> None:
        """The feed's rows of one commit (`event_rows` as inserted into `events`, `agents` their user agents)."""
        if not event_rows or self.store.chdb_path is not None:  # chdb's store has no other node
            return
        node = self.node
        rows = [(committed, node, *_FROM_EVENT(row), agent) for row, agent in zip(event_rows, agents)]
        try:
            await self.store.ch.insert(f"{self.store.db}.live", [c for c, _ in LIVE_COLUMNS],
                                       [k for _, k in LIVE_COLUMNS], rows)
        except Exception as exc:  # the feed is best effort: the events themselves are committed
            log.warning("live feed rows not written: %s", exc)

    async def run(self) -> None:
        store = self.store
        projects: list[int] = []
        refreshed = expired = float("-inf")
        seen: dict[str, int] = {}  # uuid (hex) -> its commit stamp, for stamps within LOOKBACK_MS of mark
        mark: int | None = None  # the latest stamp seen; None: nobody watched at the last poll
        failed = float("-inf")
        while True:
            await asyncio.sleep(POLL_S)
            try:
                if time.monotonic() - expired > EXPIRE_EVERY_S:
                    await self._expire()
                    expired = time.monotonic()
                if time.monotonic() - refreshed > PROJECTS_REFRESH_S:
                    projects = [p.id for p in await store.list_projects()]
                    refreshed = time.monotonic()
                watched = [p for p in projects if store.wants is None or store.wants(p)]
                if not watched:
                    mark = None
                    continue
                priming = mark is None
                if priming:
                    since = now_ms() - int(POLL_S * 1000)  # up to a poll before a client came, it was there
                    seen.clear()
                    mark = (await store.ch.select(
                        f"SELECT max(committed) FROM {store.t('live')} WHERE node != {sql_literal(self.node)}"))[0][0]
                fresh = []
                for committed, uid, project_id, ts, name, distinct_id, path, props, agent in await store.ch.select(
                    f"SELECT committed, hex(uuid), project_id, ts, name, distinct_id, path, props, user_agent"
                    f" FROM {store.t('live')} WHERE committed >= {mark - LOOKBACK_MS}"
                    f" AND node != {sql_literal(self.node)} AND project_id IN ({', '.join(map(str, watched))})"
                    " ORDER BY committed, ts"
                ):
                    if uid in seen:
                        continue
                    seen[uid] = committed
                    mark = max(mark, committed)
                    if not priming or committed >= since:
                        fresh.append(CommittedEvent(project_id, ts, name, distinct_id or None, path or None,
                                                    props or None, agent))
                for uid in [uid for uid, committed in seen.items() if committed < mark - LOOKBACK_MS]:
                    del seen[uid]
                if fresh and store.on_commit is not None:
                    store.on_commit(fresh)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ClickHouse away for a while: the feed resumes when it answers
                if time.monotonic() - failed > ERROR_LOG_EVERY_S:
                    log.warning("live feed: reading other nodes' commits failed: %s", exc)
                    failed = time.monotonic()

    async def _expire(self) -> None:
        """Drop the days of feed rows before yesterday (UTC) on every server."""
        keep = int((datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y%m%d"))
        for transport in self.store.transports:
            for (partition,) in await transport.select(
                f"SELECT DISTINCT partition FROM system.parts WHERE database = {sql_literal(self.store.db)}"
                " AND table = 'live' AND active"
            ):
                if int(partition) < keep:
                    await transport.execute(f"ALTER TABLE {self.store.db}.live DROP PARTITION {int(partition)}")
