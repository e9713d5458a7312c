"""Look-ups every read shares: interned strings by id, and the persons that have some traits."""

from __future__ import annotations

import json

from pyroaring import BitMap

from pulse.storage.sqlite.day_cache import Snapshot


def json_path(key: str) -> str:
    """The JSON path of a top-level key, quoted: SQLite reads backslash escapes in a quoted label."""
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def trait_people(snap: Snapshot, project_id: int, traits: tuple[tuple[str, str], ...]) -> BitMap:
    """The persons of the project that have every trait given; kept until the writer next merges traits
    into one of the project's persons (and for the rest of the read in any case)."""
    key = (snap.conn.filename, project_id, "trait people", traits)
    found = snap.memo.get(key)
    if found is not None:
        return found
    row = snap.conn.execute("SELECT value FROM meta WHERE key = ?", (f"traits:{project_id}",)).fetchone()
    generation = 0 if row is None else row[0]
    found = snap.memo[key] = snap.days.get(key, generation)
    if found is None:
        sql = "SELECT id FROM persons WHERE project_id = ?"
        params: list = [project_id]
        for name, value in traits:
            sql += " AND CAST(json_extract(traits, ?) AS TEXT) = ?"
            params += [json_path(name), value]
        found = snap.memo[key] = BitMap(row[0] for row in snap.conn.execute(sql, params))
        snap.days.put(key, generation, found)
    return found


_UTM_COLUMNS = (("utm_source", "utm_source_id"), ("utm_medium", "utm_medium_id"), ("utm_campaign", "utm_campaign_id"))


def utm_sessions(snap: Snapshot, project_id: int, filters) -> BitMap | None:
    """The sessions of the project whose UTM values are those the filters ask for (None without UTM filters):
    a session's values are those of its first page view, now, so this is read at every read."""
    terms = [(column, getattr(filters, name)) for name, column in _UTM_COLUMNS if getattr(filters, name) is not None]
    if not terms:
        return None
    key = ("utm sessions", project_id, tuple(terms))
    found = snap.memo.get(key)
    if found is None:
        found = snap.memo[key] = BitMap(row[0] for row in snap.conn.execute(
            "SELECT id FROM sessions WHERE project_id = ? AND "
            + " AND ".join(f"{column} = (SELECT id FROM strings WHERE value = ?)" for column, _ in terms),
            [project_id, *(value for _, value in terms)]))
    return found


def string_ids(snap: Snapshot, values: list[str]) -> dict[str, int]:
    """The interned id of each of `values` that has one."""
    if not values:
        return {}
    marks = ", ".join("?" * len(values))
    return dict(snap.conn.execute(f"SELECT value, id FROM strings WHERE value IN ({marks})", values))


def strings(snap: Snapshot, ids) -> dict[int, str]:
    return dict(snap.conn.execute("SELECT id, value FROM strings WHERE id IN (SELECT value FROM json_each(?))",
                                  (json.dumps(list(ids)),)))
