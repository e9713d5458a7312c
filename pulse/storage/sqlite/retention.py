"""Retention: cohorts of persons by the period of their first start event ever, and how many of each came back
with a return event in each period after.

Every number is a set of persons per period, which `digests.totals` gives exactly and cheaply for any filters:
whole hours from the rollups (nothing but the event filtered) or from the day cache, the rest scanned. A
person's first start event is looked for over all the project's data, from its earliest hour on.
"""

from __future__ import annotations

from dataclasses import replace

from pyroaring import BitMap

from pulse.protocol import CohortCounts
from pulse.storage.model import HOUR_MS, Filters, Window
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.digests import totals


def _with_event(filters: Filters, name: str | None) -> Filters | None:
    """The filters of one event name (None: any) on top of the request's; None when they cannot both hold."""
    if name is None:
        return filters
    if filters.event is not None and filters.event != name:
        return None
    return replace(filters, event=name)


def _persons(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters | None) -> BitMap:
    if filters is None or start >= end:
        return BitMap()
    return totals(snap, project_id, Window(start, end), filters).users


def _earliest(snap: Snapshot, project_id: int) -> int | None:
    """The project's first moment with data: its first raw event, or its first rollup hour (kept after a prune)."""
    raw = snap.conn.execute("SELECT min(ts) FROM events WHERE project_id = ?", (project_id,)).fetchone()[0]
    hour = snap.conn.execute("SELECT min(hour) FROM hourly WHERE project_id = ?", (project_id,)).fetchone()[0]
    found = [t for t in (raw, None if hour is None else hour * HOUR_MS) if t is not None]
    return min(found) if found else None


def retention(snap: Snapshot, project_id: int, edges: list[int], cohorts: int, periods: int,
              start_event: str | None, return_event: str | None, filters: Filters, now_ms: int
              ) -> list[CohortCounts]:
    """Per cohort period [edges[c], edges[c + 1]) for c < `cohorts`: the persons whose first event matching the
    filters and `start_event` ever falls in it, and of them, per period i = 0 … periods - 1 after it (that has
    begun by `now_ms` and has edges), those with an event matching the filters and `return_event` in it."""
    starting, returning = _with_event(filters, start_event), _with_event(filters, return_event)
    earliest = _earliest(snap, project_id)
    if earliest is None:
        return [CohortCounts(0, [0] if edges[c] <= now_ms else []) for c in range(cohorts)]
    seen = _persons(snap, project_id, earliest, edges[0], starting)
    returns: dict[int, BitMap] = {}
    found = []
    for c in range(cohorts):
        if edges[c] > now_ms:
            found.append(CohortCounts(0, []))
            continue
        started = _persons(snap, project_id, edges[c], edges[c + 1], starting)
        cohort = started - seen
        seen |= started
        returned = []
        for q in range(c, min(c + periods, len(edges) - 1)):
            if edges[q] > now_ms:
                break
            if not cohort:
                returned.append(0)
                continue
            if q not in returns:
                returns[q] = _persons(snap, project_id, edges[q], edges[q + 1], returning)
            returned.append(len(cohort & returns[q]))
        found.append(CohortCounts(len(cohort), returned))
    return found
