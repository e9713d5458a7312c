"""Paths against a recount, in plain Python, of the funnels' generated population: every session from its
first starting step, its next steps in time order (a step repeated right after itself once), as a tree."""

from __future__ import annotations

import pytest

from tests.server.test_funnels import DAYS_WINDOW, HOURS_WINDOW, bound, is_step, matches, population, shop

__all__ = ["population", "shop"]  # the fixtures, shared


def walks(sent, start_step: str, start: int, end: int, filters: dict) -> list[list[str]]:
    """Per session with the starting step: the steps from its first one on."""
    sessions: dict[str, list] = {}
    for item in sorted(sent, key=lambda i: i.ts):
        if start <= item.ts < end and matches(item, filters):
            sessions.setdefault(item.session, []).append(item)
    found = []
    for events in sessions.values():
        firsts = [i for i, item in enumerate(events) if is_step(item, start_step)]
        if not firsts:
            continue
        steps = [events[firsts[0]].step]
        for item in events[firsts[0] + 1:]:
            if item.step != steps[-1]:
                steps.append(item.step)
        found.append(steps)
    return found


def tree(step: str, walked: list[list[str]], level: int, depth: int, limit: int) -> dict:
    """The node of the sessions `walked` (their steps from the root) that reached this step at `level`."""
    ended = sum(1 for w in walked if len(w) == level + 1)
    if level == depth:
        return {"step": step, "sessions": len(walked), "dropped": ended, "other": len(walked) - ended, "next": []}
    following: dict[str, list] = {}
    for w in walked:
        if len(w) > level + 1:
            following.setdefault(w[level + 1], []).append(w)
    ranked = sorted(following.items(), key=lambda item: (-len(item[1]), item[0]))
    return {"step": step, "sessions": len(walked), "dropped": ended,
            "other": sum(len(ws) for _, ws in ranked[limit:]),
            "next": [tree(name, ws, level + 1, depth, limit) for name, ws in ranked[:limit]]}


CASES = [
    ("/", "page_view:/", 3, 5),
    ("/pricing", "page_view:/pricing", 2, 2),
    ("signup", "signup", 4, 3),
    ("page_view", "page_view", 1, 5),
    ("page_view:/blog", "page_view:/blog", 10, 1),
]


@pytest.mark.parametrize("asked, step, depth, limit", CASES)
@pytest.mark.parametrize("filters", [{}, {"browser": "Firefox"}, {"prop.plan": "pro"}, {"trait.tier": "gold"}])
async def test_paths_match_a_recount(shop, population, asked, step, depth, limit, filters):
    for start, end in (DAYS_WINDOW, HOURS_WINDOW):
        found = await shop("paths", start=asked, depth=str(depth), limit=str(limit), **{"from": start, "to": end},
                           **filters)
        walked = walks(population[1], step, bound(start), bound(end, True), filters)
        assert found["root"] == tree(asked if not asked.startswith("/") else step, walked, 0, depth, limit)
    if not filters:
        assert found["root"]["sessions"] > 0 and found["root"]["next"]


@pytest.mark.parametrize("params, field", [
    ({}, "start"),
    ({"start": "/", "depth": "0"}, "depth"),
    ({"start": "/", "depth": "11"}, "depth"),
    ({"start": "/", "limit": "x"}, "limit"),
    ({"start": ":/x"}, "start"),
    ({"start": "/", "steps": "a,b"}, "steps"),
])
async def test_bad_parameters_are_400s_naming_them(shop, params, field):
    found = await shop("paths", 400, range="7d", **params)
    assert found["field"] == field and found["error"].startswith(f"{field}: ")
