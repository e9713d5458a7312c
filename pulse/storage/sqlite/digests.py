"""Event-level numbers of a window (events, users, sessions, and per event name), each part answered the
cheapest way it can be: whole hours from the rollups when nothing but the event name is filtered; under
other filters, whole hours from cached digests (cut from per-person tallies under trait filters alone, else
counted from the event columns, or without them scanned, once per day); the minutes at the edges by raw
scans.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator


from pulse.storage.model import Filters, Window
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.aggregates import Totals, from_rollups, merge, name_id, names_from_rollups
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.scans import Digest, cached_scans, scan_digest, scan_totals, trait_people
from pulse.storage.sqlite.tallies import from_tallies, tallies_kept


def cached_digests(snap: Snapshot, project_id: int, hours: tuple[int, int], filters: Filters
                   ) -> Iterator[Digest]:
    """Digests of the whole days and single hours in `hours` under `filters`."""
    if filters.traits_only:
        people = trait_people(snap, project_id, filters.traits)

        def compute(start: int, end: int) -> Digest:
            if not tallies_kept(snap, project_id, start, end) and column_scans.available(snap, project_id):
                return scan_digest(snap, project_id, start, end, filters)  # quicker than the tallies made anew
            return from_tallies(snap, project_id, start, end, people)
    else:
        def compute(start: int, end: int) -> Digest:
            return scan_digest(snap, project_id, start, end, filters)
    return cached_scans(snap, project_id, hours, filters, ("digest",), compute)


def digests(snap: Snapshot, project_id: int, window: Window, filters: Filters) -> Iterator[Digest]:
    """Digests that together cover the window: whole hours from the day cache (for filters it can hold),
    the rest scanned now."""
    hours, raw = window.split()
    if hours is not None:
        yield from cached_digests(snap, project_id, hours, filters)
    for start, end in raw:
        yield scan_digest(snap, project_id, start, end, filters)


def totals(snap: Snapshot, project_id: int, window: Window, filters: Filters = Filters()) -> Totals:
    """Events, and the exact sets of users and sessions, of the non-bot events in the window."""
    found = Totals()
    if not filters.rollup_ready:
        for digest in digests(snap, project_id, window, filters):
            found.add(digest.total)
        return found
    event_id = name_id(snap, filters.event)
    if event_id < 0:
        return found
    hours, raw = window.split()
    if hours is not None:
        found.add(from_rollups(snap, project_id, hours, event_id))
    for start, end in raw:
        found.add(scan_totals(snap, project_id, start, end, filters))
    return found


def totals_and_names(snap: Snapshot, project_id: int, window: Window, filters: Filters
                     ) -> tuple[Totals, dict[str, Totals]]:
    """Events, users and sessions in the window, and events and users per event name, in one pass."""
    if not filters.rollup_ready:
        found = Totals()
        names: dict[str, Totals] = defaultdict(Totals)
        for digest in digests(snap, project_id, window, filters):
            found.add(digest.total)
            merge([digest.names], names)
        return found, names
    event_id = name_id(snap, filters.event)
    if event_id < 0:
        return Totals(), {}
    hours, raw = window.split()
    found = from_rollups(snap, project_id, hours, event_id) if hours is not None else Totals()  # fresh, safe to add to
    names = names_from_rollups(snap, project_id, hours, filters.event) if hours is not None else defaultdict(Totals)
    for start, end in raw:
        digest = scan_digest(snap, project_id, start, end, filters)
        found.add(digest.total)
        merge([digest.names], names)
    return found, names
