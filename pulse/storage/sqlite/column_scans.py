"""Reads from the event columns (`columns`): the events of a span that match some filters found by comparing
columns, and what the raw scans in `scans` count from them, counted with numpy instead of row by row.

Each filter becomes one comparison: event name, path, referrer, country, language and screen class by their
interned ids; browser, OS and device through the set of user agents that have them; UTM values through the set of
sessions that have them (read from the sessions table at the read's snapshot, so a session whose first page view
came late is matched by its values now); traits through the set of persons that have them; a property by the rows
that have the key with that value.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pyroaring import BitMap

from pulse.storage.model import HOUR_MS, PAGE_VIEW, Filters
from pulse.storage.sqlite.aggregates import Totals, summed_hours
from pulse.storage.sqlite.columns import Segment, project_view
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.lookups import string_ids, strings, trait_people, utm_sessions

_STRING_FILTERS = (("name", "event"), ("path", "path"), ("referrer", "referrer"), ("country", "country"),
                   ("language", "language"), ("screen", "screen"))


@dataclass(slots=True)
class Matched:
    """The events that matched: per segment, the positions of its matching rows (ascending)."""

    parts: list[tuple[Segment, np.ndarray]]

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.parts)

    def column(self, name: str) -> np.ndarray:
        """One field of every matching event, as int64, in the order of `parts`."""
        if not self.parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([segment.cols[name][rows].astype(np.int64) for segment, rows in self.parts])

    def _hits(self, segment: Segment, rows: np.ndarray, prop) -> tuple[np.ndarray, np.ndarray | slice]:
        """(indexes among `rows`, positions in prop.rows) of the rows that have the key."""
        first, last = int(rows[0]), int(rows[-1])
        bounds = np.array([first, last], dtype=prop.rows.dtype)  # the haystack's type: no copy of it
        low, high = np.searchsorted(prop.rows, bounds[0]), np.searchsorted(prop.rows, bounds[1], "right")
        have = prop.rows[low:high].astype(np.int64)
        if last - first + 1 == len(rows):  # every row of a range: no search needed
            return have - first, slice(low, high)
        at = np.searchsorted(rows, have)
        hit = rows[np.minimum(at, len(rows) - 1)] == have
        return at[hit], np.flatnonzero(hit) + low

    def prop(self, key: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """For each matching event that has the key: its index among the matching events (the order of
        `column`), the code of its value, and the values the codes stand for."""
        values: dict[str, int] = {}
        found_at, found_codes = [], []
        offset = 0
        for segment, rows in self.parts:
            prop = segment.props.get(key)
            if prop is not None and len(rows):
                at, where = self._hits(segment, rows, prop)
                remap = np.array([values.setdefault(v, len(values)) for v in prop.values], dtype=np.int64)
                found_at.append(at + offset)
                found_codes.append(remap[prop.codes[where].astype(np.int64)])
            offset += len(rows)
        if not found_at:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), []
        return np.concatenate(found_at), np.concatenate(found_codes), list(values)

    def keys(self) -> Iterator[tuple[str, np.ndarray]]:
        """Per property key, the indexes (among the matching events) of those that have it."""
        gathered: dict[str, list[np.ndarray]] = {}
        offset = 0
        for segment, rows in self.parts:
            if len(rows):
                for key, prop in segment.props.items():
                    at, _ = self._hits(segment, rows, prop)
                    if len(at):
                        gathered.setdefault(key, []).append(at + offset)
            offset += len(rows)
        for key, parts in gathered.items():
            yield key, np.concatenate(parts)


def _lookup(ids: BitMap | list[int]) -> np.ndarray:
    """A table that is True at each id given, for indexing by a column."""
    ids = np.fromiter(ids, dtype=np.int64)
    table = np.zeros(int(ids.max()) + 1 if len(ids) else 1, dtype=bool)
    table[ids] = True
    return table


def _in(column: np.ndarray, table: np.ndarray) -> np.ndarray:
    """column's values that are True in `table` (values past its end are not)."""
    inside = column < len(table)
    found = np.zeros(len(column), dtype=bool)
    found[inside] = table[column[inside]]
    return found


def _cut(snap: Snapshot, project_id: int) -> int:
    row = snap.conn.execute("SELECT value FROM meta WHERE key = ?", (f"pruned_before:{project_id}",)).fetchone()
    return 0 if row is None else row[0]


def _terms(snap: Snapshot, project_id: int, filters: Filters):
    """The filters as (column, id) equalities and (column, lookup table) memberships; False when nothing can
    match."""
    wanted = {attr: getattr(filters, attr) for _, attr in _STRING_FILTERS if getattr(filters, attr) is not None}
    ids = string_ids(snap, list(wanted.values()))
    equal: list[tuple[str, int]] = []
    for column, attr in _STRING_FILTERS:
        if attr in wanted:
            if wanted[attr] not in ids:
                return False
            equal.append((column, ids[wanted[attr]]))
    tables: list[tuple[str, np.ndarray]] = []
    agent_terms = [(c, v) for c, v in (("browser", filters.browser), ("os", filters.os), ("device", filters.device))
                   if v is not None]
    if agent_terms:
        agents = [row[0] for row in snap.conn.execute(
            "SELECT id FROM agents WHERE " + " AND ".join(f"{c} = ?" for c, _ in agent_terms),
            [v for _, v in agent_terms])]
        if not agents:
            return False
        tables.append(("agent", _lookup(agents)))
    sessions = utm_sessions(snap, project_id, filters)
    if sessions is not None:
        if not sessions:
            return False
        tables.append(("session", _lookup(sessions)))
    if filters.traits:
        people = trait_people(snap, project_id, filters.traits)
        if not people:
            return False
        tables.append(("person", _lookup(people)))
    return equal, tables


def _view(snap: Snapshot, project_id: int) -> tuple[list[Segment], int] | None:
    """The project's segments, and the last event id this read's snapshot holds (the builder may have read
    a newer snapshot: rows past it are left out, so that a read sees one state of the table)."""
    key = ("columns", project_id)
    if key not in snap.memo:
        got = project_view(snap.columns, snap.conn, project_id)
        if got is not None:
            got = (got[0], snap.conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
        snap.memo[key] = got
    return snap.memo[key]


def available(snap: Snapshot, project_id: int) -> bool:
    """Whether this read can count the project's events from the columns."""
    return _view(snap, project_id) is not None


def matched(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters) -> Matched | None:
    """The non-bot events of [start, end) that match the filters, from the columns; None when the columns
    cannot answer (then the raw table is read instead)."""
    got = _view(snap, project_id)
    if got is None:
        return None
    segments, highest = got
    start = max(start, _cut(snap, project_id))
    if not segments or start >= end:
        return Matched([])
    terms = snap.memo.get(("terms", project_id, filters))
    if terms is None:
        terms = snap.memo[("terms", project_id, filters)] = _terms(snap, project_id, filters)
    if terms is False:
        return Matched([])
    equal, tables = terms
    parts = []
    for segment in segments:
        if segment.rows == 0 or segment.last_ts < start or segment.first_ts >= end:
            continue
        i, j = segment.span(start, end)
        if i == j:
            continue
        keep = np.ones(j - i, dtype=bool) if segment.hi <= highest else segment.cols["id"][i:j] <= highest
        for column, value in equal:
            keep &= segment.cols[column][i:j] == np.int64(value)
        for column, table in tables:
            keep &= _in(segment.cols[column][i:j], table)
        for key, value in filters.props:
            prop = segment.props.get(key)
            code = None if prop is None else prop.index.get(value)
            if code is None:
                keep[:] = False
                break
            rows = prop.rows_of(code)
            bounds = np.array([i, j], dtype=rows.dtype)  # the haystack's type: no copy of it
            rows = rows[np.searchsorted(rows, bounds[0]):np.searchsorted(rows, bounds[1])].astype(np.int64) - i
            has = np.zeros(j - i, dtype=bool)
            has[rows] = True
            keep &= has
        rows = np.flatnonzero(keep) + i
        if len(rows):
            parts.append((segment, rows))
    return Matched(parts)


# -- counting ------------------------------------------------------------------------------------------------------


def bitmap(values: np.ndarray) -> BitMap:
    """A set of ids from a column (repeats allowed). Roaring bitmaps are made fastest from sorted ids: small
    columns are sorted, large ones marked in a table of every id up to their largest."""
    if len(values) > 20_000:
        seen = np.zeros(int(values.max()) + 1, dtype=bool)
        seen[values] = True
        values = np.flatnonzero(seen)
    else:
        values = np.sort(values)
    found = array("I")
    found.frombytes(values.astype(np.uint32).tobytes())
    return BitMap(found)


def _narrow_keys(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Keys less their least, in the narrowest type that holds them (numpy sorts those by radix)."""
    low = int(keys.min())
    spread = int(keys.max()) - low
    for kind in (np.uint8, np.uint16):
        if spread <= np.iinfo(kind).max:
            return (keys - low).astype(kind), low
    return keys - low, low


def groups(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, indexes of the rows with that key) for each key of a column."""
    if not len(keys):
        return
    narrow, low = _narrow_keys(keys)
    order = np.argsort(narrow, kind="stable")
    ordered = narrow[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    for first, last in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(ordered)].tolist()):
        yield int(ordered[first]) + low, order[first:last]


def totals(found: Matched) -> Totals:
    if not len(found):
        return Totals()
    sessions = found.column("session")
    return Totals(len(found), bitmap(found.column("person")), bitmap(sessions[sessions > 0]))


def per_value(keys: np.ndarray, persons: np.ndarray) -> dict[int, Totals]:
    """Events and users per key."""
    return {key: Totals(len(rows), bitmap(persons[rows])) for key, rows in groups(keys)}


def hour_spans(ts: np.ndarray) -> Iterator[tuple[int, np.ndarray | slice]]:
    """(hour, its rows) of a time column: slices when it is in time order (one segment's part), else indexes."""
    if len(ts) and bool(np.all(ts[1:] >= ts[:-1])):
        first, last = int(ts[0]) // HOUR_MS, int(ts[-1]) // HOUR_MS
        edges = np.searchsorted(ts, np.arange(first, last + 2, dtype=np.int64) * HOUR_MS).tolist()
        for hour, (low, high) in enumerate(zip(edges, edges[1:]), start=first):
            if low < high:
                yield hour, slice(low, high)
        return
    yield from groups(ts // HOUR_MS)


def digest_parts(snap: Snapshot, found: Matched):
    """(total, hours, names, pages, agents) of the matching events, as `scans.Digest` holds them."""
    if not len(found):
        return Totals(), {}, {}, {}, {}
    ts, persons, sessions = found.column("ts"), found.column("person"), found.column("session")
    names, paths = found.column("name"), found.column("path")
    hours = {}
    for hour, rows in hour_spans(ts):
        hour_sessions = sessions[rows]
        hours[hour] = Totals(len(hour_sessions), bitmap(persons[rows]), bitmap(hour_sessions[hour_sessions > 0]))
    total = summed_hours(hours)
    by_name = per_value(names, persons)
    page_view = snap.conn.execute("SELECT id FROM strings WHERE value = ?", (PAGE_VIEW,)).fetchone()
    viewed = (names == page_view[0]) & (paths > 0) if page_view is not None else np.zeros(len(ts), dtype=bool)
    by_page = per_value(paths[viewed], persons[viewed])
    by_agent = {key or None: value for key, value in per_value(found.column("agent"), persons).items()}
    named = strings(snap, by_name.keys() | by_page.keys())
    return (total, hours, {named[k]: v for k, v in by_name.items()}, {named[k]: v for k, v in by_page.items()},
            by_agent)
