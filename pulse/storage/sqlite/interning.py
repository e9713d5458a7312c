"""Interned strings and user agents, and the day's salt: the writer's caches of its small lookup tables.

Runs in the writer process only. Names, URLs, paths and referrers are stored once in `strings` and
user agents once in `agents`; events refer to them by id. The caches mirror committed rows: after a
failed transaction BatchApplier.reset drops them with everything else it keeps.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import apsw
import msgspec

from pulse.enrich import parse_agent

# entries kept per cache of ids (~120 bytes an entry; a site's open sessions fit many times over); past it
# a cache is emptied and refilled by the batched lookups of the next commits
CACHE_LIMIT = 50_000
# values per `IN (SELECT value FROM json_each(?))` lookup
CHUNK = 5000

_encode = msgspec.json.Encoder().encode


def json_chunks(values: list) -> Iterator[str]:
    """The values as JSON arrays of at most CHUNK, one per `IN (SELECT value FROM json_each(?))` lookup."""
    for start in range(0, len(values), CHUNK):
        yield _encode(values[start:start + CHUNK]).decode()


class Interner:
    """Ids of strings and user agents, inserted on first sight, and the salt of the day's ip hashes."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        self.strings: dict[str, int] = {}
        self.agents: dict[str, tuple[int, bool]] = {}
        self.salts: dict[int, bytes] = {}

    def trim(self) -> None:
        """Empty the string cache once it holds more than CACHE_LIMIT ids."""
        if len(self.strings) > CACHE_LIMIT:
            self.strings.clear()

    def string_id(self, value: str) -> int:
        found = self.strings.get(value)
        if found is not None:
            return found
        row = self.conn.execute("SELECT id FROM strings WHERE value = ?", (value,)).fetchone()
        if row is None:
            self.conn.execute("INSERT INTO strings(value) VALUES (?)", (value,))
            found = self.conn.last_insert_rowid()
        else:
            found = row[0]
        self.strings[value] = found
        return found

    def opt_string_id(self, value: str | None) -> int | None:
        return None if value is None else self.string_id(value)

    def agent(self, user_agent: str) -> tuple[int, bool]:
        """The agent's id, and whether it is a bot's."""
        found = self.agents.get(user_agent)
        if found is not None:
            return found
        info = parse_agent(user_agent)
        row = self.conn.execute("SELECT id FROM agents WHERE ua = ?", (user_agent,)).fetchone()
        if row is None:
            self.conn.execute(
                "INSERT INTO agents(ua, browser, os, device, is_bot) VALUES (?, ?, ?, ?, ?)",
                (user_agent, info.browser, info.os, info.device, int(info.is_bot)),
            )
            agent_id = self.conn.last_insert_rowid()
        else:
            agent_id = row[0]
        found = (agent_id, info.is_bot)
        self.agents[user_agent] = found
        return found

    def salt(self, day: int) -> bytes:
        """The day's salt of ip hashes; made on the day's first event, when the earlier days' are deleted."""
        found = self.salts.get(day)
        if found is not None:
            return found
        row = self.conn.execute("SELECT salt FROM salts WHERE day = ?", (day,)).fetchone()
        if row is None:
            found = secrets.token_bytes(16)
            self.conn.execute("INSERT INTO salts(day, salt) VALUES (?, ?)", (day, found))
            self.conn.execute("DELETE FROM salts WHERE day < ?", (day,))
        else:
            found = row[0]
        self.salts = {day: found}
        return found
