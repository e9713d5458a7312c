"""The hourly rollups as the writer keeps them: per key, a count of events and the sets of its users and sessions.

Runs in the writer process only. `hourly` is keyed by (project, hour, event name, bot), with name 0
for every event; `hourly_dims` by (project, dimension, hour, value, bot) for page views by path, and
events by user agent, country, language and screen class. The sets are roaring bitmaps of person and session ids, stored serialized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import apsw
from pyroaring import BitMap

DIM_AGENT = 1  # browser, OS and device follow from the user agent
DIM_PAGE = 2  # page views by path
DIM_COUNTRY = 3  # events by the visitor's country (a string id), when known
DIM_LANGUAGE = 4  # events by the browser's language (a string id), when known
DIM_SCREEN = 5  # events by screen class (a string id), when known

# keys whose whole is kept in memory per table; past it (and with nothing left to compact) the cache is
# emptied and keys are loaded again as commits touch them
ROLLUP_CACHE_LIMIT = 20_000
COMPACT_EVERY_S = 2.0


@dataclass(slots=True)
class Rollup:
    """The whole of one (project, hour, event, bot) key, and how many rows hold it."""

    events: int = 0
    users: BitMap = field(default_factory=BitMap)
    sessions: BitMap = field(default_factory=BitMap)
    rows: int = 0


class RollupStore:
    """One rollup table. Each commit adds a row per touched key holding only what is new to the key (its
    events, and the ids not yet in its sets), so a key's rows are disjoint and add up; `compact` merges
    a key's rows into one. The cache holds the whole of every key touched lately."""

    def __init__(self, conn: apsw.Connection, table: str, key: tuple[str, ...], sessions: bool) -> None:
        self.conn = conn
        self.sessions = sessions
        columns = [*key, "seq", "events", "users", "user_set"] + (["sessions", "session_set"] if sessions else [])
        match = " AND ".join(f"{column} = ?" for column in key)
        self.insert_sql = f"INSERT INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        self.load_sql = (f"SELECT events, user_set{', session_set' if sessions else ''} FROM {table}"
                         f" WHERE {match}")
        self.delete_sql = f"DELETE FROM {table} WHERE {match}"
        self.clear()

    def clear(self) -> None:
        self.cache: dict[tuple, Rollup] = {}
        self.uncompacted: set[tuple] = set()

    def get(self, key: tuple) -> Rollup:
        found = self.cache.get(key)
        if found is not None:
            return found
        found = Rollup()
        for row in self.conn.execute(self.load_sql, key):
            found.events += row[0]
            found.users |= BitMap.deserialize(row[1])
            if self.sessions:
                found.sessions |= BitMap.deserialize(row[2])
            found.rows += 1
        if found.rows > 1:
            self.uncompacted.add(key)
        self.cache[key] = found
        return found

    def add(self, deltas: dict[tuple, list], seq: int) -> None:
        """deltas: key -> [events, BitMap of users, BitMap of sessions]; writes one row per key."""
        rows = []
        for key, (count, users, sessions) in deltas.items():
            rollup = self.get(key)
            users -= rollup.users
            rollup.events += count
            rollup.users |= users
            rollup.rows += 1
            if rollup.rows > 1:
                self.uncompacted.add(key)
            row = (*key, seq, count, len(users), users.serialize())
            if self.sessions:
                sessions -= rollup.sessions
                rollup.sessions |= sessions
                row += (len(sessions), sessions.serialize())
            rows.append(row)
        self.conn.executemany(self.insert_sql, rows)

    def compact(self) -> int:
        """Rewrite every key kept in several rows as one row; returns how many keys were compacted."""
        keys, self.uncompacted = self.uncompacted, set()
        rows = []
        for key in keys:
            rollup = self.get(key)
            row = (*key, 0, rollup.events, len(rollup.users), rollup.users.serialize())
            if self.sessions:
                row += (len(rollup.sessions), rollup.sessions.serialize())
            rows.append(row)
            rollup.rows = 1
        self.conn.executemany(self.delete_sql, list(keys))
        self.conn.executemany(self.insert_sql, rows)
        return len(keys)


class RollupSets:
    """Both rollup tables, written together: from the events counted per (project, hour, name, bot) and
    per (project, dimension, hour, value, bot), and compacted every COMPACT_EVERY_S."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.hourly = RollupStore(conn, "hourly", ("project_id", "hour", "name_id", "bot"), sessions=True)
        self.dims = RollupStore(conn, "hourly_dims", ("project_id", "dim", "hour", "value_id", "bot"),
                                sessions=False)
        self.compacted_at = time.monotonic()

    def trim(self) -> None:
        """Empty each cache past ROLLUP_CACHE_LIMIT keys that has nothing left to compact."""
        for store in (self.hourly, self.dims):
            if len(store.cache) > ROLLUP_CACHE_LIMIT and not store.uncompacted:
                store.cache.clear()

    def write(self, groups: dict[tuple[int, int, int, int], list], dims: dict[tuple[int, int, int, int, int], list],
              seq: int) -> None:
        """Each key of both tables with counted events gets a row of what they add (per event and for all).

        groups: (project, hour, name, bot) -> [events, person ids, session ids]; dims: (project, dim, hour,
        value, bot) -> [events, person ids]; seq: unique per commit."""
        deltas: dict[tuple[int, int, int, int], list] = {}
        for (project_id, hour, name_id, bot), (count, users, sessions) in groups.items():
            for key in ((project_id, hour, name_id, bot), (project_id, hour, 0, bot)):
                delta = deltas.get(key)
                if delta is None:
                    deltas[key] = [count, BitMap(users), BitMap(sessions)]
                else:
                    delta[0] += count
                    delta[1].update(users)
                    delta[2].update(sessions)
        self.hourly.add(deltas, seq)
        self.dims.add({key: [count, BitMap(users), None] for key, (count, users) in dims.items()}, seq)

    def compact_due(self, now: float) -> bool:
        return now - self.compacted_at > COMPACT_EVERY_S and bool(self.hourly.uncompacted or self.dims.uncompacted)

    def compact(self) -> int:
        """Merge the rows of every key of both tables kept in several rows; returns how many keys."""
        self.compacted_at = time.monotonic()
        return self.hourly.compact() + self.dims.compact()
