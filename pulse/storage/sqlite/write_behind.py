"""What stored events add to rollups, sessions and persons, kept in the writer's memory until a flush.

Runs in the writer process only. Each commit's events join what earlier commits kept, so a rollup
key or a changed session or person row is written once per flush rather than once per commit.
"""

from __future__ import annotations

from collections.abc import Callable

from pulse.storage.model import HOUR_MS
from pulse.storage.sqlite.rollup_sets import DIM_AGENT, DIM_PAGE

# A session's kept changes, as a list of these fields (one list per changed session, so kept cheap): the
# columns of `sessions` they change, with the parameters of identities' UPDATEs named alike
SESSION_FIELDS = ("first_ts", "last_ts", "events", "pageviews", "entry_ts", "entry_path_id", "referrer_id",
                  "utm_source_id", "utm_medium_id", "utm_campaign_id", "exit_ts", "exit_path_id", "agent_id")
(FIRST, LAST, EVENTS, PAGEVIEWS, ENTRY_TS, ENTRY_PATH, ENTRY_REF, ENTRY_SRC, ENTRY_MED, ENTRY_CAMP, EXIT_TS,
 EXIT_PATH, AGENT) = range(len(SESSION_FIELDS))


class Kept:
    """The changes of events stored after `derived_through`, not yet written."""

    def __init__(self, opt_string_id: Callable[[str | None], int | None], derived_through: int) -> None:
        self.opt_string_id = opt_string_id  # interns an entry page's UTM values when the entry changes
        # (project, hour, name, bot) -> [events, person ids, session ids]
        self.groups: dict[tuple[int, int, int, int], list] = {}
        # (project, dim, hour, value, bot) -> [events, person ids]
        self.dims: dict[tuple[int, int, int, int, int], list] = {}
        # person id -> [first ts, last ts, events]
        self.persons: dict[int, list[int]] = {}
        # session id -> [first_ts, … agent_id] as SESSION_FIELDS
        self.sessions: dict[int, list] = {}
        self.since: float | None = None  # when the oldest change kept was made (monotonic)
        self.derived_through = derived_through  # the last event whose changes are all written

    def count(self, project_id: int, ts: int, name_id: int, bot: int, person_id: int, session_id: int | None,
              agent_id: int, page_path_id: int | None) -> None:
        """Add one event to the kept rollup and person changes; page_path_id: its path if a page view."""
        hour = ts // HOUR_MS
        key = (project_id, hour, name_id, bot)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = [0, [], []]
        group[0] += 1
        group[1].append(person_id)
        if session_id is not None:
            group[2].append(session_id)
        dims = self.dims
        by_agent = (project_id, DIM_AGENT, hour, agent_id, bot)
        for key in (by_agent,) if page_path_id is None else (by_agent, (project_id, DIM_PAGE, hour, page_path_id, bot)):
            dim = dims.get(key)
            if dim is None:
                dim = dims[key] = [0, []]
            dim[0] += 1
            dim[1].append(person_id)
        person = self.persons.get(person_id)
        if person is None:
            self.persons[person_id] = [ts, ts, 1]
        else:
            if ts < person[0]:
                person[0] = ts
            elif ts > person[1]:
                person[1] = ts
            person[2] += 1

    def count_in_session(self, session_id: int, ts: int, page_view: bool, path_id: int | None,
                         referrer_id: int | None, utm: tuple, agent_id: int) -> None:
        """Add one event to its session's kept changes; utm is (source, medium, campaign) of its page."""
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
                source, medium, campaign = utm
                delta[ENTRY_TS:EXIT_TS] = (ts, path_id, referrer_id, self.opt_string_id(source),
                                           self.opt_string_id(medium), self.opt_string_id(campaign))
            if delta[EXIT_TS] is None or ts >= delta[EXIT_TS]:
                delta[EXIT_TS] = ts
                delta[EXIT_PATH] = path_id
