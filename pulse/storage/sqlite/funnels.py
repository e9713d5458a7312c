"""Funnels: how many persons went from a first step on to each next one, within a time window of their first.

The events of the window that match the filters and some step are read in one bulk scan (only the columns a
funnel needs, along event ids where the window's events are in time order), grouped by person (events carry
the person after identify, so an anonymous visitor who signs up halfway is one person), and walked in time
order: from each of a person's first-step events, each next step is the first event of it after the step
before, no later than the window after the first step. The occurrence that gets furthest counts (the earliest
of equals), and so does its first-step event's value for a breakdown.

When the server keeps event columns, the same walk runs on arrays: the step events of each whole day (under the
filters) come from the columns once and stay in the day cache while the day's events are unchanged (they hold
only what an event never changes: its time, person, steps and the id a breakdown value is read by), and every
occurrence is walked at once, step by step, each next step found by a binary search in that step's events
sorted by (person, ts, id). Breakdown values that can change (a session's UTM source, a person's traits) are
read at the read's snapshot.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from statistics import median

import numpy as np

from pulse.protocol import FunnelGroup, FunnelStep
from pulse.storage.model import Filters, Window
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.columns import narrow
from pulse.storage.sqlite.connection import checkpoint
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.scans import cached_scans, json_path, scan_sql, strings

RATE_DIGITS = 4  # conversion rates are rounded as the goals report's are

# what a breakdown groups by: an SQL expression over `events e LEFT JOIN agents a` giving the event's value
_STRING_OF = "(SELECT value FROM strings WHERE id = e.{})"
BREAKDOWN_VALUES = {
    "browser": "a.browser",
    "os": "a.os",
    "device": "a.device",
    "referrer": _STRING_OF.format("referrer_domain_id"),
    "utm_source": ("(SELECT us.value FROM sessions x JOIN strings us ON us.id = x.utm_source_id"
                   " WHERE x.id = e.session_id)"),
    "country": _STRING_OF.format("country_id"),
    "language": _STRING_OF.format("language_id"),
    "screen": _STRING_OF.format("screen_id"),
}
_PROP_VALUE = "CAST(json_extract(e.props, ?) AS TEXT)"
_TRAIT_VALUE = "(SELECT CAST(json_extract(p.traits, ?) AS TEXT) FROM persons p WHERE p.id = e.person_id)"


def breakdown_value(breakdown: str | None) -> tuple[str, list]:
    """The SQL expression (and its parameters) of a breakdown's value on an event; NULL without a breakdown."""
    if breakdown is None:
        return "NULL", []
    if breakdown.startswith("prop."):
        return _PROP_VALUE, [json_path(breakdown[5:])]
    if breakdown.startswith("trait."):
        return _TRAIT_VALUE, [json_path(breakdown[6:])]
    return BREAKDOWN_VALUES[breakdown], []


def _step_ids(snap: Snapshot, steps: list[tuple[str, str | None]]) -> list[tuple[int, int | None]]:
    """(event name id, path id or None for any path) per step; -1 for a name or path never seen."""
    wanted = {text for step in steps for text in step if text is not None}
    ids = dict(snap.conn.execute("SELECT value, id FROM strings WHERE value IN (SELECT value FROM json_each(?))",
                                 (json.dumps(sorted(wanted)),)))
    return [(ids.get(name, -1), None if path is None else ids.get(path, -1)) for name, path in steps]


def _walk(times: list[int], positions: list[list[int]], window_ms: int) -> tuple[int, list[int]]:
    """The best occurrence of one person's funnel: (steps reached, position of each step's event).

    `times` are the person's events in order, `positions[k]` the positions of those that are step k. From each
    first-step event the earliest next-step event after the previous one reaches furthest (any later choice
    leaves less room), so each occurrence is walked once, step by step."""
    best: list[int] = []
    last_step = len(positions)
    for first in positions[0]:
        limit = times[first] + window_ms
        chain = [first]
        for candidates in positions[1:]:
            index = bisect_right(candidates, chain[-1])
            if index == len(candidates) or times[candidates[index]] > limit:
                break
            chain.append(candidates[index])
        if len(chain) > len(best):
            best = chain
            if len(best) == last_step:
                break
    return len(best), best


def _steps(names: list[str], reached: list[list[float]]) -> list[FunnelStep]:
    """The answer's steps from, per step, the seconds from the previous step of each person who reached it."""
    found = []
    first = len(reached[0])
    for k, (name, seconds) in enumerate(zip(names, reached)):
        persons = len(seconds)
        previous = len(reached[k - 1]) if k else first
        found.append(FunnelStep(
            step=name, persons=persons,
            conversion=round(persons / first, RATE_DIGITS) if first else 0.0,
            from_previous=round(persons / previous, RATE_DIGITS) if previous else 0.0,
            median_seconds=round(median(seconds), 1) if k and seconds else None,
        ))
    return found


def funnel(snap: Snapshot, project_id: int, window: Window, filters: Filters, steps: list[tuple[str, str | None]],
           names: list[str], window_ms: int, breakdown: str | None, limit: int
           ) -> tuple[list[FunnelStep], list[FunnelGroup] | None]:
    """The funnel of `steps` ((event, path or None) each, shown as `names`) over the window's events that match
    the filters, every step inside the window; per breakdown value too when one is asked for (at most `limit`
    values, most first-step persons first)."""
    step_ids = _step_ids(snap, steps)
    if column_scans.matched(snap, project_id, window.start, window.start, filters) is not None:
        return _from_columns(snap, project_id, window, filters, step_ids, names, window_ms, breakdown, limit)
    source, where, params = scan_sql(snap, project_id, window.start, window.end, filters)
    value_sql, value_params = breakdown_value(breakdown)
    events: dict[int, list[tuple]] = defaultdict(list)
    for person_id, ts, event_id, name, path, value in snap.conn.execute(
        f"SELECT e.person_id, e.ts, e.id, e.name_id, e.path_id, {value_sql} {source}"
        f" WHERE {where} AND e.name_id IN (SELECT value FROM json_each(?))",
        [*value_params, *params, json.dumps(sorted({name for name, _ in step_ids}))],
    ):
        events[person_id].append((ts, event_id, name, path, value))
    # per breakdown value (None for all), per step: seconds from the previous step of each person who reached it
    reached: dict[str | None, list[list[float]]] = {}
    groups: dict[str | None, list[list[float]]] = {}
    overall = reached[None] = [[] for _ in steps]
    for person_events in events.values():
        person_events.sort()
        positions: list[list[int]] = [[] for _ in steps]
        for position, (_, _, name, path, _) in enumerate(person_events):
            for k, (step_name, step_path) in enumerate(step_ids):
                if name == step_name and (step_path is None or path == step_path):
                    positions[k].append(position)
        if not positions[0]:
            continue
        count, chain = _walk([row[0] for row in person_events], positions, window_ms)
        group = None
        if breakdown is not None:
            value = person_events[chain[0]][4]
            group = groups.get(value)
            if group is None:
                group = groups[value] = [[] for _ in steps]
        for k in range(count):
            seconds = (person_events[chain[k]][0] - person_events[chain[k - 1]][0]) / 1000 if k else 0.0
            overall[k].append(seconds)
            if group is not None:
                group[k].append(seconds)
    if breakdown is None:
        return _steps(names, overall), None
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1][0]), item[0] is None, item[0] or ""))[:limit]
    return _steps(names, overall), [FunnelGroup(value=value, steps=_steps(names, counts)) for value, counts in ranked]


# -- from the event columns ----------------------------------------------------------------------------------------

# the column a breakdown's value is read by: an agent's browser, OS or device; a string's text; a session's UTM
# source; a person's trait (the person column itself); ("prop", KEY): the event's property value
_BREAKDOWN_COLUMNS = {"browser": "agent", "os": "agent", "device": "agent", "referrer": "referrer",
                      "utm_source": "session", "country": "country", "language": "language", "screen": "screen"}
_AGENT_VALUE = {"browser": "browser", "os": "os", "device": "device"}


def _breakdown_column(breakdown: str | None) -> str | tuple[str, str] | None:
    if breakdown is None or breakdown.startswith("trait."):
        return None  # a trait is read by the person, which the step events hold anyway
    if breakdown.startswith("prop."):
        return "prop", breakdown[5:]
    return _BREAKDOWN_COLUMNS[breakdown]


@dataclass(frozen=True, slots=True)
class StepEvents:
    """The events of a span that are a step of a funnel, in (ts, id) order: time, person, which steps each one is
    (bit k: step k), and the id its breakdown value is read by (for a property, the code of its value in
    `values`, -1 without one)."""

    ts: np.ndarray
    person: np.ndarray
    steps: np.ndarray
    by: np.ndarray | None
    values: tuple[str, ...] = ()

    def cache_size(self) -> int:
        arrays = (self.ts, self.person, self.steps) + (() if self.by is None else (self.by,))
        return 64 + sum(a.nbytes for a in arrays) + sum(64 + len(v or "") for v in self.values)


def _one_run(rows: np.ndarray) -> bool:
    return bool(len(rows)) and int(rows[-1]) - int(rows[0]) + 1 == len(rows)


def picked(rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """The positions `rows[chosen]`, for `chosen` a mask or indexes (counted without reading `rows` when they
    are one run)."""
    at = np.flatnonzero(chosen) if chosen.dtype == bool else chosen
    return at + rows[0] if _one_run(rows) else rows[at]


def _prop_codes(segment, key: str, rows: np.ndarray, values: dict[str, int]) -> np.ndarray:
    """The code (in `values`, which gains the new ones) of each row's value of property `key`; -1 without."""
    codes = np.full(len(rows), -1, dtype=np.int64)
    prop = segment.props.get(key)
    if prop is None or not len(rows):
        return codes
    at = np.searchsorted(prop.rows, rows)
    hit = at < len(prop.rows)
    hit[hit] = prop.rows[at[hit]] == rows[hit]
    remap = np.array([values.setdefault(v, len(values)) for v in prop.values], dtype=np.int64)
    codes[hit] = remap[prop.codes[at[hit]].astype(np.int64)]
    return codes


def _step_events(snap: Snapshot, project_id: int, start: int, end: int, filters: Filters,
                 step_ids: tuple[tuple[int, int | None], ...], by: str | tuple[str, str] | None) -> StepEvents:
    """The step events of [start, end) that match the filters, from the columns."""
    found = column_scans.matched(snap, project_id, start, end, filters)
    ts, ids, person, steps, values_by = [], [], [], [], []
    values: dict[str, int] = {}
    for segment, rows in found.parts:
        name = segment.at("name", rows)
        path = None
        mask = np.zeros(len(rows), dtype=np.uint16)
        for k, (step_name_id, step_path_id) in enumerate(step_ids):
            if step_name_id < 0 or (step_path_id is not None and step_path_id < 0):
                continue  # a name or path never seen is no event's
            hit = name == np.int64(step_name_id)
            if step_path_id is not None:
                if path is None:
                    path = segment.at("path", rows)
                hit &= path == np.int64(step_path_id)
            mask |= hit.astype(np.uint16) << np.uint16(k)
        keep = np.flatnonzero(mask)
        if not len(keep):
            continue
        at = rows[keep]
        ts.append(segment.cols["ts"][at].astype(np.int64))
        ids.append(segment.cols["id"][at].astype(np.int64))
        person.append(segment.cols["person"][at].astype(np.int64))
        steps.append(mask[keep])
        if isinstance(by, tuple):
            values_by.append(_prop_codes(segment, by[1], at, values))
        elif by is not None:
            values_by.append(segment.cols[by][at].astype(np.int64))
    if not ts:
        empty = np.empty(0, dtype=np.int64)
        return StepEvents(empty, empty, np.empty(0, dtype=np.uint16), None if by is None else empty)
    ts_all, ids_all = np.concatenate(ts), np.concatenate(ids)
    order = np.lexsort((ids_all, ts_all))
    chosen = None
    if by is not None:
        chosen = np.concatenate(values_by)[order]
        chosen = chosen if isinstance(by, tuple) else narrow(chosen)
    return StepEvents(ts_all[order], narrow(np.concatenate(person)[order]), np.concatenate(steps)[order], chosen,
                      tuple(values))


def _gathered(snap: Snapshot, project_id: int, window: Window, filters: Filters,
              step_ids: tuple[tuple[int, int | None], ...], by: str | tuple[str, str] | None) -> list[StepEvents]:
    """The step events of the window, whole days and hours from the day cache when the filters allow, in spans
    ordered by time."""
    hours, raw = window.split()
    spans: list[StepEvents] = []
    if hours is not None:
        spans += cached_scans(snap, project_id, hours, filters, ("funnel steps", step_ids, by),
                              lambda start, end: _step_events(snap, project_id, start, end, filters, step_ids, by))
    spans += [_step_events(snap, project_id, start, end, filters, step_ids, by) for start, end in raw]
    return sorted((span for span in spans if len(span.ts)), key=lambda span: int(span.ts[0]))


def _values(snap: Snapshot, breakdown: str, by: str | tuple[str, str] | None, ids: np.ndarray,
            prop_values: list[str]) -> list[str | None]:
    """The breakdown's value for each of the distinct ids `ids` (agent, string, session, person ids, or
    property value codes), as the SQL of `breakdown_value` reads it."""
    keys = ids.tolist()
    if isinstance(by, tuple):
        return [prop_values[code] if code >= 0 else None for code in keys]
    chunk = json.dumps(keys)
    if breakdown.startswith("trait."):
        found = dict(snap.conn.execute(
            "SELECT id, CAST(json_extract(traits, ?) AS TEXT) FROM persons"
            " WHERE id IN (SELECT value FROM json_each(?))",
            (json_path(breakdown[6:]), chunk)))
    elif by == "agent":
        found = dict(snap.conn.execute(
            f"SELECT id, {_AGENT_VALUE[breakdown]} FROM agents WHERE id IN (SELECT value FROM json_each(?))", (chunk,)))
    elif by == "session":
        found = dict(snap.conn.execute(
            "SELECT x.id, us.value FROM sessions x JOIN strings us ON us.id = x.utm_source_id"
            " WHERE x.id IN (SELECT value FROM json_each(?))", (chunk,)))
    else:
        found = strings(snap, keys)
    return [found.get(key) for key in keys]


def _walked(person: np.ndarray, ts: np.ndarray, steps: np.ndarray, count: int, window_ms: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """`_walk` for every person at once, over step events sorted by (person, ts, id): (the positions of each
    step's event in every person's best occurrence, one column per person; the steps each one reached).

    Every first-step event starts an occurrence; step by step, each occurrence still going takes the first event
    of the next step after its last one (a binary search in that step's positions) if it is the same person's
    and within the window of the occurrence's first step. A person's best occurrence is the one that got
    furthest, the earliest of equals."""
    candidates = [np.flatnonzero(steps & np.uint16(1 << k)) for k in range(count)]
    first = candidates[0]
    if not len(first):
        return np.empty((count, 0), dtype=np.int64), np.empty(0, dtype=np.int64)
    chain = np.full((count, len(first)), -1, dtype=np.int64)
    chain[0] = first
    reached = np.ones(len(first), dtype=np.int64)
    limit = ts[first] + window_ms
    going = np.arange(len(first))
    for k in range(1, count):
        checkpoint()
        previous = chain[k - 1, going]
        at = np.searchsorted(candidates[k], previous, side="right")
        inside = at < len(candidates[k])
        going, previous, at = going[inside], previous[inside], at[inside]
        following = candidates[k][at]
        taken = (person[following] == person[previous]) & (ts[following] <= limit[going])
        going = going[taken]
        chain[k, going] = following[taken]
        reached[going] += 1
    # occurrences are in (person, ts, id) order: per person, the first with the most steps
    owner = person[first]
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(first)]))
    best = np.flatnonzero(reached == np.maximum.reduceat(reached, starts)[group])
    best = best[np.r_[True, group[best][1:] != group[best][:-1]]]
    return chain[:, best], reached[best]


def _reached(ts: np.ndarray, chain: np.ndarray, reached: np.ndarray) -> list[list[float]]:
    """Per step, the seconds from the previous step of each person who reached it (as `funnel` gathers them)."""
    found = [[0.0] * len(reached)]
    for k in range(1, len(chain)):
        going = reached > k
        found.append(((ts[chain[k, going]] - ts[chain[k - 1, going]]) / 1000).tolist())
    return found


def _from_columns(snap: Snapshot, project_id: int, window: Window, filters: Filters,
                  step_ids: list[tuple[int, int | None]], names: list[str], window_ms: int, breakdown: str | None,
                  limit: int) -> tuple[list[FunnelStep], list[FunnelGroup] | None]:
    """`funnel`, answered from the event columns."""
    by = _breakdown_column(breakdown)
    spans = _gathered(snap, project_id, window, filters, tuple(step_ids), by)
    checkpoint()
    count = len(step_ids)
    if not spans:
        empty = [[] for _ in step_ids]
        return _steps(names, empty), (None if breakdown is None else [])
    ts = np.concatenate([span.ts for span in spans])
    person = np.concatenate([span.person.astype(np.int64) for span in spans])
    steps = np.concatenate([span.steps for span in spans])
    prop_values: dict[str, int] = {}
    chosen = None
    if isinstance(by, tuple):  # each span's codes into one list of values
        parts = []
        for span in spans:
            remap = np.array([prop_values.setdefault(v, len(prop_values)) for v in span.values] + [-1],
                             dtype=np.int64)
            parts.append(remap[span.by.astype(np.int64)])  # -1 (no value) takes the last entry, -1
        chosen = np.concatenate(parts)
    elif by is not None:
        chosen = np.concatenate([span.by.astype(np.int64) for span in spans])
    elif breakdown is not None:  # a trait, read by the person
        chosen = person
    # only persons with a first-step event can make a funnel; the rest in (person, ts, id) order (spans are in
    # (ts, id) order, and a stable sort keeps it among each person's events)
    starters = np.zeros(int(person.max()) + 1, dtype=bool)
    starters[person[(steps & np.uint16(1)) > 0]] = True
    keep = np.flatnonzero(starters[person])
    order = keep[np.argsort(person[keep], kind="stable")]
    ts, person, steps = ts[order], person[order], steps[order]
    chain, reached = _walked(person, ts, steps, count, window_ms)
    overall = _reached(ts, chain, reached)
    if breakdown is None:
        return _steps(names, overall), None
    ids, inverse = np.unique(chosen[order][chain[0]], return_inverse=True)
    values = _values(snap, breakdown, by, ids, list(prop_values))
    codes: dict[str | None, int] = {}
    value_codes = np.array([codes.setdefault(value, len(codes)) for value in values], dtype=np.int64)
    group = value_codes[inverse]
    persons = np.bincount(group, minlength=len(codes))
    ranked = sorted(codes.items(), key=lambda item: (-persons[item[1]], item[0] is None, item[0] or ""))[:limit]
    found = []
    for value, code in ranked:
        members = group == code
        found.append(FunnelGroup(value=value, steps=_steps(names, _reached(ts, chain[:, members], reached[members]))))
    return _steps(names, overall), found
