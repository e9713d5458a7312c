"""Event property keys and values, person trait keys and values, as the SQLite store ranks them
(`pulse.storage.sqlite.breakdowns`): properties by the events in the window that match the filters and their
users, traits by how many of the window's users under the filters have them now.

Values are grouped by their raw JSON in ClickHouse and named by SQLite's text of it here (`filters.sqlite_text`):
several raw values can read as one text (`1`, `true` and `"1"`); the users of such a text are counted again over
all of its raw values at once, never summed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING

from pulse.protocol import Ranked
from pulse.storage.clickhouse.filters import check_key, current_traits, raw_keys, raw_value, sqlite_text
from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import Filters, Window

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore


def _ranked(rows: dict[str, tuple[int, int]], limit: int) -> list[Ranked]:
    ranked = [Ranked(value, count, users) for value, (count, users) in rows.items()]
    ranked.sort(key=lambda r: (-r.count, r.value))
    return ranked[:limit]


def _where(store: ClickHouseStore, project_id: int, window: Window, filters: Filters) -> str:
    return f"{store._conditions(project_id, filters)} AND ts >= {window.start} AND ts < {window.end}"


async def property_keys(store: ClickHouseStore, project_id: int, window: Window, filters: Filters,
                        limit: int) -> list[Ranked]:
    """Per key, the events that carry it (with any value, null too) and their users."""
    rows = await store.ch.select(
        f"SELECT k, count(), uniqExact(person) FROM {store.t('events')} ARRAY JOIN {raw_keys('props')} AS k"
        f" WHERE {_where(store, project_id, window, filters)} GROUP BY k")
    return _ranked({json.loads(key): (count, users) for key, count, users in rows}, limit)


async def property_values(store: ClickHouseStore, project_id: int, window: Window, filters: Filters, key: str,
                          limit: int) -> list[Ranked]:
    """Per value of one key (as text; nulls left out), its events and their users."""
    check_key(key)
    where = f"{_where(store, project_id, window, filters)} AND v != ''"
    source = f"FROM {store.t('events')} WHERE {where}"
    value = f"{raw_value('props', key)} AS v"
    texts: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for raw, count, users in await store.ch.select(f"SELECT {value}, count(), uniqExact(person) {source} GROUP BY v"):
        text = sqlite_text(raw)
        if text is not None:
            texts[text].append((raw, count, users))
    found = {text: (sum(c for _, c, _ in raws), raws[0][2]) for text, raws in texts.items()}
    shared = {raw: text for text, raws in texts.items() if len(raws) > 1 for raw, _, _ in raws}
    if shared:
        mapped = (f"transform(v, {sql_literal(list(shared))}, {sql_literal(list(shared.values()))}, '')")
        for text, users in await store.ch.select(
                f"SELECT {mapped} AS t, uniqExact(person) FROM (SELECT {value}, person {source})"
                f" WHERE v IN ({', '.join(map(sql_literal, shared))}) GROUP BY t"):
            found[text] = (found[text][0], users)
    return _ranked(found, limit)


def _active(store: ClickHouseStore, project_id: int, window: Window, filters: Filters) -> str:
    """SQL: the persons with an event in the window that matches the filters (the overview's users)."""
    return f"SELECT person FROM {store.t('events')} WHERE {_where(store, project_id, window, filters)}"


async def trait_keys(store: ClickHouseStore, project_id: int, window: Window, filters: Filters,
                     limit: int) -> list[Ranked]:
    rows = await store.ch.select(
        f"SELECT key, count() FROM ({current_traits(store, project_id)})"
        f" WHERE person GLOBAL IN ({_active(store, project_id, window, filters)}) GROUP BY key")
    return _ranked({key: (count, count) for key, count in rows}, limit)


async def trait_values(store: ClickHouseStore, project_id: int, window: Window, filters: Filters, key: str,
                       limit: int) -> list[Ranked]:
    """A person has one value per trait, so the persons of raw values read as one text add up."""
    check_key(key)
    found: dict[str, int] = defaultdict(int)
    for raw, count in await store.ch.select(
            f"SELECT value, count() FROM ({current_traits(store, project_id)}) WHERE key = {sql_literal(key)}"
            f" AND person GLOBAL IN ({_active(store, project_id, window, filters)}) GROUP BY value"):
        text = sqlite_text(raw)
        if text is not None:
            found[text] += count
    return _ranked({text: (count, count) for text, count in found.items()}, limit)
