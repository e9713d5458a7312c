"""Write-behind: what the writer writes before a request is acknowledged, and what it keeps for later.

Written before the 202. A group commit writes its events and the sessions and persons they create (new
rows, inserted once, with ids the writer hands out), commits, then answers Committed; the server
answers the requests in it only then. Nothing acknowledged is only in memory.

Kept in memory and merged. What those events add to the hourly rollups (`hourly`, `hourly_dims`) and
to sessions and persons already stored (counts, first and last times, entry and exit pages; also the
counts of the sessions and persons the commit created) joins what earlier commits kept (`Kept`), so a
rollup key or a changed row is written once per flush rather than once per commit: under load most
commits touch the same hours, sessions and persons.

When it is written. The rollups are few keys: a commit writes all that is kept of them once the oldest is
FLUSH_AFTER_S old, or once FLUSH_EVENTS events wait for them (`due`). Sessions and persons can be many
rows (a busy site's hundreds of thousands of visitors, each seen again only now and then), and every row
changed costs a write of its own, so they are kept longer and written in slices: once their oldest change
is ROWS_AFTER_S old (or ROWS_LIMIT rows are kept), what is kept of them is sealed, and each later commit
writes SLICE_ROWS rows of the sealed changes (never fewer than its own events may have changed, so the sealed
ones go at least as fast as new ones gather) until none is left, while newer changes gather anew. So a
row seen ten times in ROWS_AFTER_S is written once, and no commit waits for more than a slice.
Everything kept, of rollups, sessions and persons alike, is written in one commit after FLUSH_IDLE_S
without a request (an idle writer leaves nothing kept), and in the last before the writer exits.

How a read is settled, and why. A client reads every event it was acknowledged: a question asked after
a 202 counts that request's events, in the rollups, sessions and persons alike. So before every read
question the store calls EventWriter.settle. When the last Committed said something is kept
(`Committed.unwritten`), settle sends a Flush frame; the writer answers it like a job, in the Committed
of the first commit after which every change of the events stored before the frame is written. Until
then each commit writes the rollups and DRAIN_SLICE_ROWS rows of sessions and persons (what is kept is
sealed at once), so a read under load waits a few commits rather than making one commit write all a busy
site's rows while every request waits. When nothing is kept no frame is sent and the read goes on at once. The wait is bounded by the write deadline (`write_timeout_s`): a writer already past it
is not asked, and a Flush not answered by then is waited for no longer; both are WriterStalled (a 503),
never an answer that misses acknowledged events. A flush that fails (a full disk) leaves the changes
kept, and the read answers from what is written.

Crash recovery. meta `derived_through` is the last event whose rollup changes are all written, and meta
`rows_through` the last event whose session and person changes are all written; each moves in the
transaction that writes them. Each session and person row also holds its own `derived_through`: the last
event whose changes to it are written (a slice writes some rows of a sealed generation before others).
Sessions and persons hold nothing of later events but their times (safe to apply twice), so after a crash
or a rolled-back transaction BatchApplier.reset rebuilds `Kept` by replaying the events stored after the
lower of the two marks: an event's rollup changes when it is after `derived_through`, its person's and
session's when it is after that row's own mark (BatchApplier._replay). `pulse verify` leaves those events
out until they are written.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import numpy as np

from pulse.storage.sqlite.rollup_sets import COUNTED

# when the rollups are written, and everything (above)
FLUSH_AFTER_S = 0.5
FLUSH_IDLE_S = 0.05
FLUSH_EVENTS = 100_000
# when the changes kept of sessions and persons are sealed, and how many rows a commit writes of them (above)
ROWS_AFTER_S = 30.0
ROWS_LIMIT = 300_000
SLICE_ROWS = 2_000
DRAIN_SLICE_ROWS = 20_000  # while a read waits (below)

READ_DERIVED_THROUGH = "SELECT value FROM meta WHERE key = 'derived_through'"
WRITE_DERIVED_THROUGH = "UPDATE meta SET value = ? WHERE key = 'derived_through'"
READ_ROWS_THROUGH = "SELECT value FROM meta WHERE key = 'rows_through'"
WRITE_ROWS_THROUGH = "UPDATE meta SET value = ? WHERE key = 'rows_through'"


def due(unwritten: int, kept_for_s: float) -> bool:
    """Whether a commit writes the rollups: `unwritten` events wait for them, the oldest kept for `kept_for_s`."""
    return unwritten > FLUSH_EVENTS or kept_for_s >= FLUSH_AFTER_S


# A session's kept changes, as a list of these fields (one list per changed session, so kept cheap): the
# columns of `sessions` they change, with the parameters of identities' UPDATEs named alike
SESSION_FIELDS = ("first_ts", "last_ts", "events", "pageviews", "entry_ts", "entry_path_id", "referrer_id",
                  "utm_source_id", "utm_medium_id", "utm_campaign_id", "exit_ts", "exit_path_id", "agent_id")
(FIRST, LAST, EVENTS, PAGEVIEWS, ENTRY_TS, ENTRY_PATH, ENTRY_REF, ENTRY_SRC, ENTRY_MED, ENTRY_CAMP, EXIT_TS,
 EXIT_PATH, AGENT) = range(len(SESSION_FIELDS))


class Kept:
    """The changes of stored events not yet written: rollups', after `derived_through`; sessions' and persons',
    after `rows_through` (those of the events up to `sealed_through` sealed, the later ones gathering)."""

    def __init__(self, opt_string_id: Callable[[str | None], int | None], derived_through: int,
                 rows_through: int) -> None:
        self.opt_string_id = opt_string_id  # interns an entry page's UTM values when the entry changes
        # the rollup_sets.COUNTED fields of every event counted, one after another (take_counted: as rows)
        self.counted = array("q")
        # person id -> [first ts, last ts, events]
        self.persons: dict[int, list[int]] = {}
        # session id -> [first_ts, … agent_id] as SESSION_FIELDS
        self.sessions: dict[int, list] = {}
        # the sealed changes of sessions and persons (above), of the events up to sealed_through
        self.sealed_persons: dict[int, list[int]] = {}
        self.sealed_sessions: dict[int, list] = {}
        self.sealed_through = 0
        self._person_order: list[int] = []  # the sealed ids, highest first (take_sealed takes from the end)
        self._session_order: list[int] = []
        self.since: float | None = None  # when the oldest rollup change kept was made (monotonic)
        self.rows_since: float | None = None  # when the oldest session or person change kept was made
        self.derived_through = derived_through  # the last event whose rollup changes are all written
        self.rows_through = rows_through  # the last event whose session and person changes are all written

    def seal(self, through: int) -> None:
        """Seal the session and person changes kept of the events up to `through` (none is sealed now)."""
        self.sealed_persons, self.persons = self.persons, {}
        self.sealed_sessions, self.sessions = self.sessions, {}
        self._person_order = _descending(self.sealed_persons)
        self._session_order = _descending(self.sealed_sessions)
        self.sealed_through = through
        self.rows_since = None

    def take_sealed(self, count: int | None = None) -> tuple[dict[int, list[int]], dict[int, list]]:
        """Up to `count` sealed person and session changes (all if None; taken out), the lowest ids of each table
        first, in the same share of each: a slice changes rows that lie together (a few pages of each table and
        index) rather than rows all over the tables, so every page is written about once per seal, not once a
        slice."""
        persons, sessions = self.sealed_persons, self.sealed_sessions
        total = len(persons) + len(sessions)
        if count is None or count >= total:
            self.sealed_persons, self.sealed_sessions = {}, {}
            self._person_order, self._session_order = [], []
            return persons, sessions
        share = -(-count * len(persons) // total)  # rounded up: a person change left alone is taken too
        return _take(persons, self._person_order, share), _take(sessions, self._session_order, count - share)

    def count_person(self, person_id: int, ts: int) -> None:
        """Add one event to its person's kept changes."""
        person = self.persons.get(person_id)
        if person is None:
            self.persons[person_id] = [ts, ts, 1]
        else:
            if ts < person[0]:
                person[0] = ts
            elif ts > person[1]:
                person[1] = ts
            person[2] += 1

    def count_rollup(self, project_id: int, ts: int, name_id: int, bot: int, person_id: int, session_id: int | None,
                     agent_id: int, page_path_id: int | None, country_id: int | None, language_id: int | None,
                     screen_id: int | None) -> None:
        """Add one event to the kept rollup changes; page_path_id: its path if a page view; the string ids
        of its country, language and screen class when known."""
        self.counted.extend((project_id, ts, name_id, bot, person_id, session_id or 0, agent_id, page_path_id or 0,
                             country_id or 0, language_id or 0, screen_id or 0))

    def take_counted(self) -> np.ndarray:
        """The events counted for the rollups, a row each (rollup_sets.COUNTED), taken out."""
        counted, self.counted = self.counted, array("q")
        return np.frombuffer(counted, dtype=np.int64).reshape(-1, len(COUNTED))

    def count_in_session(self, session_id: int, ts: int, page_view: bool, path_id: int | None,
                         referrer_id: int | None, source: str | None, medium: str | None, campaign: str | None,
                         agent_id: int) -> None:
        """Add one event to its session's kept changes; source, medium, campaign: its page's UTM values."""
        changes = self.sessions
        delta = changes.get(session_id)
        if delta is None:
            delta = changes[session_id] = [ts, ts, 0, 0, None, None, None, None, None, None, None, None, agent_id]
        elif ts < delta[FIRST]:
            delta[FIRST] = ts
        elif ts > delta[LAST]:
            delta[LAST] = ts
        delta[EVENTS] += 1
        if page_view:
            delta[PAGEVIEWS] += 1
            if delta[ENTRY_TS] is None or ts < delta[ENTRY_TS]:
                delta[ENTRY_TS] = ts
                delta[ENTRY_PATH] = path_id
                delta[ENTRY_REF] = referrer_id
                if source is None and medium is None and campaign is None:  # most pages: no string to intern
                    delta[ENTRY_SRC] = delta[ENTRY_MED] = delta[ENTRY_CAMP] = None
                else:
                    intern = self.opt_string_id
                    delta[ENTRY_SRC], delta[ENTRY_MED], delta[ENTRY_CAMP] = (intern(source), intern(medium),
                                                                             intern(campaign))
            if delta[EXIT_TS] is None or ts >= delta[EXIT_TS]:
                delta[EXIT_TS] = ts
                delta[EXIT_PATH] = path_id


def _descending(changes: dict) -> list[int]:
    """The ids of the changes, highest first (numpy: a seal of 100,000 rows sorts in milliseconds)."""
    return np.sort(np.fromiter(changes, dtype=np.int64, count=len(changes)))[::-1].tolist()


def _take(changes: dict, order: list[int], count: int) -> dict:
    """The `count` changes of the lowest ids, taken out of `changes` and `order`."""
    if count <= 0:
        return {}
    ids = order[-count:]
    del order[-count:]
    return {row_id: changes.pop(row_id) for row_id in reversed(ids)}
