"""The writer groups the rollup changes of many events at once (numpy): what it writes to `hourly` and
`hourly_dims` must be what a plain recount of the same events gives, key by key, for any ids and times,
however far apart (also where the grouping falls back from packed keys to sorting rows)."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
from pyroaring import BitMap

from pulse.storage.model import HOUR_MS
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.rollup_sets import (
    COUNTED, DIM_AGENT, DIM_COUNTRY, DIM_LANGUAGE, DIM_PAGE, DIM_SCREEN, RollupSets, _group,
)
from pulse.storage.sqlite.schema import migrate

DIMS = ((DIM_AGENT, "agent_id"), (DIM_PAGE, "page_path_id"), (DIM_COUNTRY, "country_id"),
        (DIM_LANGUAGE, "language_id"), (DIM_SCREEN, "screen_id"))


def events(rng: random.Random, count: int, *, wide: bool) -> list[dict[str, int]]:
    """Events as the writer counts them (rollup_sets.COUNTED; 0: none). `wide`: ids and hours billions apart."""
    big = 2**31 - 1 if wide else 50
    hours = (1, 250_000) if wide else (480_000, 480_003)
    found = []
    for _ in range(count):
        found.append({
            "project_id": rng.choice((1, 2, big)), "ts": rng.randint(*hours) * HOUR_MS + rng.randrange(HOUR_MS),
            "name_id": rng.choice((3, 4, big)), "bot": rng.randint(0, 1), "person_id": rng.choice((1, 7, 2**32 - 1)),
            "session_id": rng.choice((0, 5, 9, 2**32 - 2)), "agent_id": rng.choice((1, 2, big)),
            "page_path_id": rng.choice((0, 11, big)), "country_id": rng.choice((0, 12)),
            "language_id": rng.choice((0, 13, big)), "screen_id": rng.choice((0, 14)),
        })
    return found


def recount(counted: list[dict[str, int]]) -> tuple[dict, dict]:
    """Per hourly key (name 0: every event): events, users, sessions; per dims key: events, users."""
    hourly: dict[tuple, list] = defaultdict(lambda: [0, set(), set()])
    dims: dict[tuple, list] = defaultdict(lambda: [0, set()])
    for ev in counted:
        hour = ev["ts"] // HOUR_MS
        for name in (ev["name_id"], 0):
            row = hourly[(ev["project_id"], hour, name, ev["bot"])]
            row[0] += 1
            row[1].add(ev["person_id"])
            if ev["session_id"]:
                row[2].add(ev["session_id"])
        for dim, field in DIMS:
            if ev[field]:
                row = dims[(ev["project_id"], dim, hour, ev[field], ev["bot"])]
                row[0] += 1
                row[1].add(ev["person_id"])
    return hourly, dims


def stored(tmp_path, counted: list[dict[str, int]]) -> tuple[dict, dict]:
    conn = connect(tmp_path / "pulse.db")
    migrate(conn)
    array = np.array([[ev[field] for field in COUNTED] for ev in counted], dtype=np.int64)
    with conn:
        RollupSets(conn).write(array, seq=1)
    hourly = {(project, hour, name, bot): [events, set(BitMap.deserialize(users)), set(BitMap.deserialize(sessions))]
              for project, hour, name, bot, events, users, sessions in conn.execute(
                  "SELECT project_id, hour, name_id, bot, events, user_set, session_set FROM hourly")}
    dims = {(project, dim, hour, value, bot): [events, set(BitMap.deserialize(users))]
            for project, dim, hour, value, bot, events, users in conn.execute(
                "SELECT project_id, dim, hour, value_id, bot, events, user_set FROM hourly_dims")}
    conn.close()
    return hourly, dims


def test_the_rollups_written_are_a_recount_of_the_events(tmp_path):
    counted = events(random.Random(7), 3000, wide=False)
    hourly, dims = recount(counted)
    assert stored(tmp_path, counted) == (dict(hourly), dict(dims))


def test_ids_and_hours_too_far_apart_to_pack_are_grouped_alike(tmp_path):
    counted = events(random.Random(8), 3000, wide=True)
    hourly, dims = recount(counted)
    assert stored(tmp_path, counted) == (dict(hourly), dict(dims))


def test_grouping_finds_each_distinct_key_once():
    rng = np.random.default_rng(3)
    for high in (5, 2**40):  # packed, and too wide to pack
        columns = [rng.integers(0, 4, 500) * high for _ in range(4)]
        keys, codes = _group(*columns)
        rows = list(zip(*(column.tolist() for column in columns)))
        assert sorted(keys) == sorted(set(rows)) and len(keys) == len(set(keys))
        assert [keys[code] for code in codes.tolist()] == rows
