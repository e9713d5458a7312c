"""Analytics queries: whole hours from the hourly rollups, the partial hours at the edges from raw events."""

from __future__ import annotations

from dataclasses import dataclass

import apsw
from pyroaring import BitMap

from pulse.storage.rows import HOUR_MS


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open time range [start, end) in epoch milliseconds."""

    start: int
    end: int

    def split(self) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
        """(whole hours [h0, h1) or None, raw millisecond pieces that are not whole hours)."""
        first_hour = -(-self.start // HOUR_MS)
        last_hour = self.end // HOUR_MS
        if first_hour >= last_hour:
            return None, [(self.start, self.end)] if self.start < self.end else []
        raw = []
        if self.start < first_hour * HOUR_MS:
            raw.append((self.start, first_hour * HOUR_MS))
        if last_hour * HOUR_MS < self.end:
            raw.append((last_hour * HOUR_MS, self.end))
        return (first_hour, last_hour), raw


@dataclass(slots=True)
class Totals:
    events: int
    users: BitMap
    sessions: BitMap


_HOURLY_ALL = (
    "SELECT events, user_set, session_set FROM hourly"
    " WHERE project_id = ? AND name_id = 0 AND bot = 0 AND hour >= ? AND hour < ?"
)
_RAW_EDGE = (
    "SELECT e.person_id, e.session_id FROM events e LEFT JOIN agents a ON a.id = e.agent_id"
    " WHERE e.project_id = ? AND e.ts >= ? AND e.ts < ? AND coalesce(a.is_bot, 0) = 0"
)


def totals(conn: apsw.Connection, project_id: int, window: Window) -> Totals:
    """Events, and the exact sets of users and sessions, of the non-bot events in the window."""
    hours, raw = window.split()
    events = 0
    user_sets: list[BitMap] = []
    session_sets: list[BitMap] = []
    if hours is not None:
        for count, user_set, session_set in conn.execute(_HOURLY_ALL, (project_id, *hours)):
            events += count
            user_sets.append(BitMap.deserialize(user_set))
            session_sets.append(BitMap.deserialize(session_set))
    for start, end in raw:
        users = BitMap()
        sessions = BitMap()
        for person_id, session_id in conn.execute(_RAW_EDGE, (project_id, start, end)):
            events += 1
            users.add(person_id)
            if session_id is not None:
                sessions.add(session_id)
        user_sets.append(users)
        session_sets.append(sessions)
    return Totals(events, union(user_sets), union(session_sets))


def union(sets: list[BitMap]) -> BitMap:
    return BitMap.union(BitMap(), *sets)


def overview(conn: apsw.Connection, project_id: int, window: Window) -> dict[str, int]:
    found = totals(conn, project_id, window)
    return {"events": found.events, "unique_users": len(found.users), "sessions": len(found.sessions)}
