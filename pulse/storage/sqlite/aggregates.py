"""Answers from the hourly rollups: per hour and event name, the events and the exact sets of users and
sessions, written by the writer behind the events. Whole hours of a window with nothing but the event name
filtered are read from them (through the day cache), never from raw events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyroaring import BitMap

from pulse.storage.sqlite.day_cache import Snapshot, cached_spans


@dataclass(slots=True)
class Totals:
    events: int = 0
    users: BitMap = field(default_factory=BitMap)
    sessions: BitMap = field(default_factory=BitMap)

    def add(self, other: Totals) -> None:
        self.events += other.events
        self.users |= other.users
        self.sessions |= other.sessions

    def cache_size(self) -> int:
        return 64 + 2 * (len(self.users) + len(self.sessions))


def summed_hours(hours: dict[int, Totals]) -> Totals:
    """The totals of disjoint hours: events add up, sets unite."""
    total = Totals()
    if hours:
        total.events = sum(t.events for t in hours.values())
        total.users = BitMap.union(*(t.users for t in hours.values()))
        total.sessions = BitMap.union(*(t.sessions for t in hours.values()))
    return total


def merge(parts: Iterator[dict], into: dict | None = None) -> dict:
    """Add up {value: Totals} parts into fresh totals (cached parts are never changed)."""
    found: dict = defaultdict(Totals) if into is None else into
    for part in parts:
        for value, total in part.items():
            found[value].add(total)
    return found


def name_id(snap: Snapshot, name: str | None) -> int | None:
    """The interned id of an event name; 0 (every event) for None; -1 when no such event exists."""
    if name is None:
        return 0
    row = snap.conn.execute("SELECT id FROM strings WHERE value = ?", (name,)).fetchone()
    return -1 if row is None else row[0]


def hourly(snap: Snapshot, project_id: int, hours: tuple[int, int], name_id: int) -> dict[int, Totals]:
    """Per hour, the rollup of one event name (0: every event), bots left out."""
    found: dict[int, Totals] = {}
    for hour, events, user_set, session_set in snap.conn.execute(
        "SELECT hour, events, user_set, session_set FROM hourly"
        " WHERE project_id = ? AND name_id = ? AND bot = 0 AND hour >= ? AND hour < ?",
        (project_id, name_id, *hours),
    ):
        total = found.get(hour)
        if total is None:
            total = found[hour] = Totals()
        total.add(Totals(events, BitMap.deserialize(user_set), BitMap.deserialize(session_set)))
    return found


def from_rollups(snap: Snapshot, project_id: int, hours: tuple[int, int], name_id: int) -> Totals:
    """The rollups of one event name (0: all) summed over whole hours."""
    def compute(span: tuple[int, int]) -> Totals:
        total = Totals()
        for hour in hourly(snap, project_id, span, name_id).values():
            total.add(hour)
        return total

    found = Totals()
    for cached in cached_spans(snap, project_id, hours, name_id, ("name", name_id), compute):
        found.add(cached)
    return found


def _named_hours(snap: Snapshot, project_id: int, hours: tuple[int, int], only: str | None
                 ) -> dict[str, Totals]:
    """Per event name, events and users over whole hours (rows read, no cache)."""
    found: dict[str, Totals] = defaultdict(Totals)
    for name, events, user_set in snap.conn.execute(
        "SELECT s.value, h.events, h.user_set FROM hourly h JOIN strings s ON s.id = h.name_id"
        " WHERE h.project_id = ? AND h.name_id != 0 AND h.bot = 0 AND h.hour >= ? AND h.hour < ?"
        + (" AND s.value = ?" if only is not None else ""),
        (project_id, *hours, *([only] if only is not None else [])),
    ):
        found[name].add(Totals(events, BitMap.deserialize(user_set)))
    return found


def names_from_rollups(snap: Snapshot, project_id: int, hours: tuple[int, int], only: str | None
                       ) -> dict[str, Totals]:
    """Per event name, events and users over whole hours."""
    only_id = 0 if only is None else name_id(snap, only)
    found: dict[str, Totals] = defaultdict(Totals)
    for cached in cached_spans(snap, project_id, hours, only_id, ("names", only),
                               lambda span: dict(_named_hours(snap, project_id, span, only))):
        for name, total in cached.items():
            found[name].add(total)
    return found
