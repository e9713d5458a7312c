"""The day cache: answers for whole UTC days (and single hours) of a window, computed once and reused
while what they were computed from is unchanged.

Every cached answer carries a fingerprint read cheaply from the database (the sum of the span's rollup
events, or a generation the writer bumps); a span is computed again only when its fingerprint moved.
The reader owns the cache and hands it to every query with its connection, as a `Snapshot`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import apsw
from pyroaring import BitMap

from pulse.storage.sqlite.columns import ColumnIndex
from pulse.storage.sqlite.connection import checkpoint


class DayCache:
    """Unions of whole UTC days of hourly rollup rows, kept while the day's rows are unchanged.

    Rollup rows only ever gain events (new rows) or merge (compaction keeps the sum), so the sum of a
    day's events says whether its union can have changed: a cached day is reused while that sum is the
    same. The sums come from the index hourly_events without reading the sets. Readers on several
    threads share the cache; cached values are never mutated.
    """

    def __init__(self, max_bytes: int = 96 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes  # roughly: two bytes per id held, the least recently used go first
        self.bytes = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[float, object, int]] = OrderedDict()

    def get(self, key: tuple, fingerprint: float) -> object | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] != fingerprint:
                return None
            self._entries.move_to_end(key)
            return found[1]

    def put(self, key: tuple, fingerprint: float, value: object) -> None:
        held = size(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self._entries[key] = (fingerprint, value, held)
            self.bytes += held
            while self.bytes > self.max_bytes and self._entries:
                self.bytes -= self._entries.popitem(last=False)[1][2]


def size(value: object) -> int:
    """About the bytes a cached value holds: sets and dicts here, the answers' own types by their
    `cache_size()`."""
    if isinstance(value, BitMap):
        return 64 + 2 * len(value)
    if isinstance(value, dict):
        return 64 + sum(size(item) for item in value.values())
    cache_size = getattr(value, "cache_size", None)
    return 64 if cache_size is None else cache_size()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a read query reads: a connection inside one read transaction, so that every statement of the
    query sees the same data, the readers' day cache, and the event columns when the server builds them."""

    conn: apsw.Connection
    days: DayCache
    columns: ColumnIndex | None = None
    memo: dict = field(default_factory=dict)  # what one read works out once (the sets its filters match)


def _whole_days(hours: tuple[int, int]) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """(hour ranges outside whole UTC days, the whole days [d0, d1) or None)."""
    first, last = -(-hours[0] // 24), hours[1] // 24
    if first >= last:
        return [hours], None
    edges = [r for r in ((hours[0], first * 24), (last * 24, hours[1])) if r[0] < r[1]]
    return edges, (first, last)


def cached_spans(snap: Snapshot, project_id: int, hours: tuple[int, int], name_id: int, kind: tuple,
                 compute: Callable[[tuple[int, int]], object],
                 extra: Callable[[tuple[int, int]], object] | None = None) -> Iterator[object]:
    """`compute(span)` for the whole days in `hours` and the single hours around them, from the day cache.

    A span's fingerprint is its events of `name_id` (0: every event, which also covers the dimension
    rollups written in the same commits), with `extra(span)` when given; a span without events is skipped.
    """
    edges, days = _whole_days(hours)
    spans = [(day * 24, day * 24 + 24) for day in range(*days)] if days is not None else []
    spans += [(hour, hour + 1) for start, end in edges for hour in range(start, end)]
    fingerprints = dict(snap.conn.execute(
        "SELECT hour, total(events) FROM hourly WHERE project_id = ? AND name_id = ? AND bot = 0"
        " AND hour >= ? AND hour < ? GROUP BY 1", (project_id, name_id, *hours)))
    for span in spans:
        checkpoint()  # cached spans run no SQL: the time limit, or a stop, ends the read here
        fingerprint = sum(fingerprints.get(hour, 0) for hour in range(*span))
        if not fingerprint:
            continue
        if extra is not None:
            fingerprint = (fingerprint, extra(span))
        key = (snap.conn.filename, project_id, *kind, *span)
        cached = snap.days.get(key, fingerprint)
        if cached is None:
            cached = compute(span)
            snap.days.put(key, fingerprint, cached)
        yield cached
