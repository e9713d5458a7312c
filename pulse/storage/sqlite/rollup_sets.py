"""The hourly rollups as the writer keeps them: per key, a count of events and the sets of its users and sessions.

Runs in the writer process only. `hourly` is keyed by (project, hour, event name, bot), with name 0
for every event; `hourly_dims` by (project, dimension, hour, value, bot) for page views by path, and
events by user agent, country, language and screen class. The sets are roaring bitmaps of person and session ids, stored serialized.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

import apsw
import numpy as np
from pyroaring import BitMap

from pulse.storage.model import HOUR_MS

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

    def write(self, counted: np.ndarray, seq: int) -> None:
        """Each key of both tables with counted events gets a row of what they add (per event and for all).

        counted: one row per event, its COUNTED fields (0: none); seq: unique per commit."""
        if not len(counted):
            return
        (project, ts, name, bot, person, session, agent, page, country, language,
         screen) = np.ascontiguousarray(counted.T)
        hour = ts // HOUR_MS
        by_person = np.argsort(person)
        by_session = np.argsort(session)
        deltas: dict[tuple, list] = {}
        for names in (name, np.zeros_like(name)):  # name 0: every event
            keys, codes = _group(project, hour, names, bot)
            counts = np.bincount(codes, minlength=len(keys))
            users = _sets(codes, person, by_person, len(keys))
            sessions = _sets(codes, session, by_session, len(keys))
            for key, count, user_set, session_set in zip(keys, counts.tolist(), users, sessions):
                session_set.discard(0)  # an event of no session
                deltas[key] = [count, user_set, session_set]
        self.hourly.add(deltas, seq)
        dims: dict[tuple, list] = {}
        for dim, values in ((DIM_AGENT, agent), (DIM_PAGE, page), (DIM_COUNTRY, country), (DIM_LANGUAGE, language),
                            (DIM_SCREEN, screen)):
            known = values != 0
            if not known.any():
                continue
            keys, codes = _group(project, hour, values, bot)
            counts = np.bincount(codes, minlength=len(keys))
            users = _sets(codes, person, by_person, len(keys), known)
            for (project_id, hour_key, value, bot_key), count, user_set in zip(keys, counts.tolist(), users):
                if value:
                    dims[(project_id, dim, hour_key, value, bot_key)] = [count, user_set, None]
        self.dims.add(dims, seq)

    def compact_due(self, now: float) -> bool:
        return now - self.compacted_at > COMPACT_EVERY_S and bool(self.hourly.uncompacted or self.dims.uncompacted)

    def compact(self) -> int:
        """Merge the rows of every key of both tables kept in several rows; returns how many keys."""
        self.compacted_at = time.monotonic()
        return self.hourly.compact() + self.dims.compact()


# what the writer counts of each event for the rollups (write_behind.Kept.count_rollup), in this order; 0 is
# none (every id starts at 1)
COUNTED = ("project_id", "ts", "name_id", "bot", "person_id", "session_id", "agent_id", "page_path_id",
           "country_id", "language_id", "screen_id")


def _group(project: np.ndarray, hour: np.ndarray, value: np.ndarray, bot: np.ndarray
           ) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """The distinct (project, hour, value, bot) of the rows, and each row's index among them.

    The four are packed into one integer (each an offset from its least, in as many values as it spans), as a
    sort of one int64 column is many times faster than numpy's sort of rows; a span too wide to pack (never
    seen: it takes hours and ids billions apart) is sorted as rows."""
    columns = (project, hour, value, bot)
    lows = [int(column.min()) for column in columns]
    spans = [int(column.max()) - low + 1 for column, low in zip(columns, lows)]
    if spans[0] * spans[1] * spans[2] * spans[3] >= 1 << 62:
        keys, codes = np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)
        return [tuple(key) for key in keys.tolist()], codes.reshape(-1)
    packed = np.zeros(len(project), dtype=np.int64)
    for column, low, span in zip(columns, lows, spans):
        packed *= span
        packed += column - low
    found, codes = np.unique(packed, return_inverse=True)
    keys = []
    for number in found.tolist():
        key = []
        for low, span in zip(reversed(lows), reversed(spans)):
            number, offset = divmod(number, span)
            key.append(offset + low)
        keys.append(tuple(reversed(key)))
    return keys, codes


def _sets(codes: np.ndarray, values: np.ndarray, by_value: np.ndarray, groups: int,
          rows: np.ndarray | None = None) -> list[BitMap]:
    """Per group, the set of its rows' values (only `rows`, a mask, if given). `by_value`: the rows in the order
    of their values, so a stable sort by group leaves each group's values sorted (a bitmap is built from a
    sorted array in a single pass)."""
    order = by_value if rows is None else by_value[rows[by_value]]
    group_codes = codes[order]
    if groups <= 1 << 16:  # numpy sorts 16-bit integers stably by radix, in one pass
        group_codes = group_codes.astype(np.uint16)
    order = order[np.argsort(group_codes, kind="stable")]
    bounds = np.searchsorted(codes[order], np.arange(groups + 1)).tolist()
    ordered = values[order].astype(np.uint32).tobytes()
    return [BitMap(array("I", ordered[start * 4:end * 4])) for start, end in zip(bounds, bounds[1:])]
