"""Fill the readers' day cache at start, newest day first, so the first dashboard opened after a restart is
as quick as the next one. One query at a time on one reader thread, one day per query: requests that
arrive meanwhile take the other threads and every query stays short."""

from __future__ import annotations

import contextlib
import logging
import time

from pulse.storage.model import DAY_MS, Filters, QueryTimeout, Window
from pulse.storage.sqlite import breakdowns, periods
from pulse.storage.sqlite.breakdowns import SESSION_DIMENSIONS
from pulse.storage.sqlite.projects import list_projects
from pulse.storage.sqlite.reader import Reader

log = logging.getLogger("pulse.warmup")

BREAKDOWNS = ("pages", "browsers", "os", "devices", "countries", "languages", "screens", *SESSION_DIMENSIONS)
PROPERTY_KEYS = 3  # the values of this many keys, most used first


def _day(snap, project_id: int, window: Window, now: int) -> None:
    """Every cached piece of one day: totals, event names, sessions, breakdowns, property keys and the values
    of the most used ones, and the per-person counts that answer trait filters."""
    periods.overview(snap, project_id, window, now)
    periods.cache_for_filters(snap, project_id, window)
    for dimension in BREAKDOWNS:
        breakdowns.breakdown(snap, project_id, window, Filters(), dimension, 10)
    for row in breakdowns.property_keys(snap, project_id, window, Filters(), PROPERTY_KEYS):
        breakdowns.property_values(snap, project_id, window, Filters(), row.value, 10)


async def warm(reader: Reader, days: int) -> None:
    began = time.monotonic()
    now = time.time_ns() // 1_000_000
    today = now // DAY_MS * DAY_MS
    projects = await reader.run(lambda snap: list_projects(snap.conn))
    done = 0
    for back in range(days + 1):
        start = today - back * DAY_MS
        window = Window(start, min(start + DAY_MS, now))
        for project in projects:
            try:
                await reader.run(_day, project.id, window, now)
            except QueryTimeout as error:  # a huge day: requests will compute it when asked
                log.warning("warm-up of project %s skipped a day: %s", project.id, error)
            done += 1
    for back in (1, 7, 30):  # the ranges offered: their first, partial days are cached by the hour
        if back <= days:
            for project in projects:
                with contextlib.suppress(QueryTimeout):
                    await reader.run(_day, project.id, Window(now - back * DAY_MS, now), now)
    log.info("warm-up: %d project-days in %.1fs, %.0f MiB cached", done, time.monotonic() - began,
             reader.days.bytes / 2**20)
