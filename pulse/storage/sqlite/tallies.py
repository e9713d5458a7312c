"""Answers from per-person tallies: for each whole day and single hour, how many events each person had
(per hour, event name, page and user agent), from one scan of all the events, kept in the day cache. A
filter on person traits alone is answered from them by cutting them down to the persons with the traits,
so no trait filter scans the events of a cached day again.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pyroaring import BitMap

from pulse.storage.model import Filters
from pulse.storage.model import HOUR_MS, PAGE_VIEW
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.aggregates import Totals, name_id, summed_hours
from pulse.storage.sqlite.day_cache import Snapshot, cached_spans, size
from pulse.storage.sqlite.lookups import strings
from pulse.storage.sqlite.scans import PAIR, Digest, scan_pass


@dataclass(frozen=True, slots=True)
class Tally:
    """How many events each person had, as bit slices: person p had the sum of 2**j over the slices j that
    hold p. Cut down to any set of persons with one intersection per slice. The slices are kept serialized,
    at about a third of the memory of live sets, and read back in microseconds."""

    slices: tuple[bytes, ...]

    @classmethod
    def of(cls, people: list[int]) -> Tally:
        """From one person id per event."""
        once = BitMap(people)
        if len(once) == len(people):
            return cls((once.serialize(),))
        counts = Counter(people).items()
        top = max(count for _, count in counts).bit_length()
        return cls(tuple(BitMap([person for person, count in counts if count >> j & 1]).serialize()
                         for j in range(top)))

    def totals(self, people: BitMap | None = None) -> Totals:
        """Events and users, of everyone or of `people` only."""
        slices = [BitMap.deserialize(s) for s in self.slices]
        users = slices[0] if len(slices) == 1 else BitMap.union(*slices)
        if people is None:
            return Totals(sum(len(s) << j for j, s in enumerate(slices)), users)
        return Totals(sum(s.intersection_cardinality(people) << j for j, s in enumerate(slices)), users & people)

    def cache_size(self) -> int:
        return 64 + sum(len(s) + 40 for s in self.slices)


@dataclass(frozen=True, slots=True)
class People:
    """Per person, what all the non-bot events of a span add to every event-level number: in all per hour,
    per event name, per page viewed and per user agent, with each hour's (person, session) pairs. Cut down
    to the persons that have some traits (`digest`), it is what a raw scan under those trait filters finds."""

    hours: dict[int, Tally]
    sessions: dict[int, tuple[array, array]]  # per hour, its distinct (person, session) pairs
    names: dict[str, Tally]
    pages: dict[str, Tally]
    agents: dict[int, Tally]

    def digest(self, people: BitMap) -> Digest:
        hours = {}
        for hour, tally in self.hours.items():
            found = tally.totals(people)
            if found.events:
                persons, sessions = self.sessions[hour]
                found.sessions = BitMap([session for person, session in zip(persons, sessions) if person in people])
                hours[hour] = found
        return Digest(summed_hours(hours), hours, _cut(self.names, people), _cut(self.pages, people),
                      _cut(self.agents, people))

    def cache_size(self) -> int:
        return 64 + 16 * sum(len(persons) for persons, _ in self.sessions.values()) + sum(
            size(part) for part in (self.hours, self.names, self.pages, self.agents))


def _cut(tallies: dict, people: BitMap) -> dict:
    found = {}
    for key, tally in tallies.items():
        total = tally.totals(people)
        if total.events:
            found[key] = total
    return found


def _tallied(people: dict) -> dict:
    """A tally per key, from one person id per event."""
    return {key: Tally.of(ids) for key, ids in people.items()}


def _column_tally(persons: np.ndarray) -> Tally:
    """`Tally.of` a column of person ids, counted with numpy."""
    counts = np.bincount(persons)
    ids = np.flatnonzero(counts)
    counts = counts[ids]
    top = int(counts.max()).bit_length()
    return Tally(tuple(column_scans.bitmap(ids[(counts >> j) & 1 == 1]).serialize() for j in range(top)))


def _column_people(snap: Snapshot, found: column_scans.Matched) -> People:
    """The `People` of the events found in the columns."""
    ts, persons, sessions = found.column("ts"), found.column("person"), found.column("session")
    names, paths = found.column("name"), found.column("path")
    hours, pairs = {}, {}
    for hour, rows in column_scans.hour_spans(ts):
        hours[hour] = _column_tally(persons[rows])
        hour_sessions = sessions[rows]
        kept = hour_sessions > 0
        both = np.unique(persons[rows][kept] << 32 | hour_sessions[kept])  # by person, then session
        pairs[hour] = (array("q", (both >> 32).tobytes()), array("q", (both & 0xFFFFFFFF).tobytes()))
    page_view = name_id(snap, PAGE_VIEW)
    viewed = (names == page_view) & (paths > 0)
    by_name = {key: _column_tally(persons[rows]) for key, rows in column_scans.groups(names)}
    by_page = {key: _column_tally(persons[viewed][rows]) for key, rows in column_scans.groups(paths[viewed])}
    agents = {key or None: _column_tally(persons[rows]) for key, rows in column_scans.groups(found.column("agent"))}
    named = strings(snap, by_name.keys() | by_page.keys())
    return People(hours, pairs, {named[k]: t for k, t in by_name.items()}, {named[k]: t for k, t in by_page.items()},
                  agents)


def scan_people(snap: Snapshot, project_id: int, start: int, end: int) -> People:
    columns = column_scans.matched(snap, project_id, start, end, Filters())
    if columns is not None:
        return _column_people(snap, columns)
    found = scan_pass(snap, project_id, start, end, Filters(), pairs=True)
    return People(_tallied(found.hours), {hour: _unpaired(found.sessions.get(hour, ())) for hour in found.hours},
                  _tallied(found.names), _tallied(found.pages), _tallied(found.agents))


def _unpaired(pairs: list[int]) -> tuple[array, array]:
    """The distinct (person, session) pairs, as a column of persons and one of sessions."""
    persons, sessions = array("q"), array("q")
    mask = (1 << PAIR) - 1
    for pair in sorted(set(pairs)):
        persons.append(pair >> PAIR)
        sessions.append(pair & mask)
    return persons, sessions


def cached_people(snap: Snapshot, project_id: int, hours: tuple[int, int]) -> Iterator[People]:
    """The `People` of the whole days and single hours in `hours`, from the day cache."""
    return cached_spans(snap, project_id, hours, 0, ("people",),
                        lambda span: scan_people(snap, project_id, span[0] * HOUR_MS, span[1] * HOUR_MS))


def tallies_kept(snap: Snapshot, project_id: int, start: int, end: int) -> bool:
    """Whether the `People` of the whole day or single hour [start, end) are in the day cache, as they are now
    (the warm-up computes them; other filters' results may have pushed them out since)."""
    hours = (start // HOUR_MS, end // HOUR_MS)
    events = snap.conn.execute("SELECT total(events) FROM hourly WHERE project_id = ? AND name_id = 0 AND bot = 0"
                               " AND hour >= ? AND hour < ?", (project_id, *hours)).fetchone()[0]
    return snap.days.get((snap.conn.filename, project_id, "people", *hours), events) is not None


def from_tallies(snap: Snapshot, project_id: int, start: int, end: int, people: BitMap) -> Digest:
    """The digest of the whole day or single hour [start, end) under filters on traits alone (`people`:
    the persons with the traits), cut from its `People`."""
    found = next(cached_people(snap, project_id, (start // HOUR_MS, end // HOUR_MS)), None)
    return Digest(Totals(), {}, {}, {}, {}) if found is None else found.digest(people)
