"""What one group commit does with the batches it takes: whose event it is, which session, which events a
retry already brought, as the SQLite writer decides them (`pulse.storage.sqlite.applier`), from state read
back from ClickHouse once per commit instead of a single writer's memory.

Retries are counted once: before the commit inserts anything, it looks up every client uuid of its batches
in `event_ids` (a materialized view of the events, ordered by project and uuid), across every shard through
the Distributed table; an event whose uuid is found, or already taken earlier in the same commit, is a
duplicate and is not inserted. A batch whose answer was lost after ClickHouse confirmed its insert is thus
stored once however often, and on whichever node, it is sent again; one whose insert failed is stored by its
retry. An event's shard follows from its person (sipHash64(person)), and a retry finds the same person (the
first attempt recorded the ids it saw), so its uuid is looked for where it was stored. Commits on one node
run one after another, so each sees the previous one's rows; two nodes that take the same new uuid at the
same instant (a retry sent while the first attempt is still in flight) can both store it: an unacknowledged
batch should not be resent while its first attempt may still be running.

Persons follow the SQLite store's rules (`identities`): an id first seen is a person of its own, named by it;
an identify links a new distinct id to the anonymous id's person, or a new anonymous id to the known person,
and never moves an event. So the person written with an event is final, and `person_ids` holds one row per id.
An identify that links a new id to an anonymous person shows the person by the new id from then on
(`renamed`, as the SQLite store renames it). Traits an event carries are written per key with a sequence number
(`sequence`) in commit order, the newest being the person's trait.
Sessions: a client session id is the session; an event without one joins its person's current inferred
session when it lies within SESSION_GAP_MS after that session's last event and not before its first by more,
and starts a new one otherwise (the current one: the latest last event).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import msgspec

from pulse.storage.clickhouse.schema import INFERRED_PREFIX

SESSION_GAP_MS = 30 * 60_000  # as the SQLite store's
_random_bits = random.Random(os.urandom(32)).getrandbits
_encode = msgspec.json.Encoder().encode


@dataclass
class People:
    """Distinct id -> person of one project, as looked up for the commit and as it changes in it."""

    known: dict[str, str]
    new: list[tuple[str, str]] = field(default_factory=list)  # (distinct id, person) to insert into person_ids
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (person, distinct id it is shown by now)

    def _add(self, distinct_id: str, person: str) -> None:
        self.known[distinct_id] = person
        self.new.append((distinct_id, person))

    def person(self, distinct_id: str) -> str:
        found = self.known.get(distinct_id)
        if found is None:
            self._add(distinct_id, distinct_id)
            return distinct_id
        return found

    def identify(self, distinct_id: str, anon_id: str) -> str:
        """Link an anonymous id to a known id: both resolve to one person from now on."""
        known = self.known.get(distinct_id)
        anon = self.known.get(anon_id)
        if known is None and anon is not None:
            self._add(distinct_id, anon)
            self.renamed.append((anon, distinct_id))
            return anon
        if known is None:
            known = self.person(distinct_id)
        if anon is None and anon_id != distinct_id:
            self._add(anon_id, known)
        return known


_last_seq = 0


def sequence(count: int) -> int:
    """The first of `count` numbers above every earlier one this process handed out (nanoseconds, so above
    other nodes' older ones): the commit order of trait and name changes."""
    global _last_seq
    first = max(_last_seq + 1, time.time_ns())
    _last_seq = first + count - 1
    return first


@dataclass
class InferredSessions:
    """Per person the current inferred session [id, first ts, last ts], as looked up and as it changes."""

    current: dict[str, list]

    def session(self, person: str, ts: int) -> str:
        held = self.current.get(person)
        if held is not None:
            session, first, last = held
            if first - SESSION_GAP_MS <= ts <= last + SESSION_GAP_MS:
                if ts < first:
                    held[1] = ts
                elif ts > last:
                    held[2] = ts
                return session
        session = f"{INFERRED_PREFIX}{_random_bits(64):016x}"
        if held is None or ts >= held[2]:
            self.current[person] = [session, ts, ts]
        return session


def current_sessions(rows: list[tuple[str, str, int, int]]) -> dict[str, list]:
    """From (person, session, first, last) rows: each person's session with the latest last event."""
    current: dict[str, list] = {}
    for person, session, first, last in rows:
        held = current.get(person)
        if held is None or (last, session) > (held[2], held[0]):
            current[person] = [session, first, last]
    return current


def trait_rows(changes: list[tuple[int, str, str]]) -> list[tuple]:
    """person_traits rows of (project, person, traits JSON) in commit order: one per key, its value's JSON."""
    rows = []
    for project_id, person, traits in changes:
        for key, value in msgspec.json.decode(traits).items():
            rows.append([project_id, person, key, _encode(value).decode()])
    first = sequence(len(rows))
    return [(*row, first + i) for i, row in enumerate(rows)]


def name_rows(changes: list[tuple[int, str, str]]) -> list[tuple]:
    """person_names rows of (project, person, distinct id) in commit order."""
    first = sequence(len(changes))
    return [(*change, first + i) for i, change in enumerate(changes)]
