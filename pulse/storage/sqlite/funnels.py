"""Funnels: how many persons went from a first step on to each next one, within a time window of their first.

The events of the window that match the filters and some step are read in one bulk scan (only the columns a
funnel needs, along event ids where the window's events are in time order), grouped by person (events carry
the person after identify, so an anonymous visitor who signs up halfway is one person), and walked in time
order: from each of a person's first-step events, each next step is the first event of it after the step
before, no later than the window after the first step. The occurrence that gets furthest counts (the earliest
of equals), and so does its first-step event's value for a breakdown.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import defaultdict
from statistics import median

from pulse.protocol import FunnelGroup, FunnelStep
from pulse.storage.model import Filters, Window
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.scans import json_path, scan_sql

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
