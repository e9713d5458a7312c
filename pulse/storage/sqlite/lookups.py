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


def strings(snap: Snapshot, ids) -> dict[int, str]:
    return dict(snap.conn.execute("SELECT id, value FROM strings WHERE id IN (SELECT value FROM json_each(?))",
                                  (json.dumps(list(ids)),)))
