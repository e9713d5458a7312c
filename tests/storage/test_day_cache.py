"""The readers' day cache: reused only while the fingerprint holds, and bounded in size."""

from __future__ import annotations

from pyroaring import BitMap

from pulse.storage.sqlite.aggregates import Totals
from pulse.storage.sqlite.day_cache import DayCache


def test_a_changed_fingerprint_misses_and_the_least_recently_used_go_first():
    cache = DayCache(max_bytes=1000)
    cache.put(("day", 1), 10.0, Totals(10, BitMap(range(100))))
    assert cache.get(("day", 1), 10.0).events == 10
    assert cache.get(("day", 1), 11.0) is None  # more events arrived for that day
    cache.put(("day", 2), 5.0, Totals(5, BitMap(range(300))))
    cache.get(("day", 1), 10.0)  # day 1 is now the most recently used
    cache.put(("day", 3), 5.0, Totals(5, BitMap(range(100))))
    assert cache.get(("day", 2), 5.0) is None and cache.get(("day", 1), 10.0) is not None
    assert cache.bytes <= 1000
