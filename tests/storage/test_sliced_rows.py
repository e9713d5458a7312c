"""Sessions and persons written in slices of a sealed generation (write_behind): every row ends equal to a
recount of the events sent, in plain Python, whatever the writer wrote before it died, and `pulse verify`
agrees at every commit."""

from __future__ import annotations

import random
import uuid

import msgspec

from pulse.storage.model import DAY_MS, HOUR_MS, Filters, Window
from pulse.storage.sqlite import applier as applier_module
from pulse.storage.sqlite import identities
from pulse.storage.sqlite.applier import BatchApplier
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.day_cache import DayCache, Snapshot
from pulse.storage.sqlite.maintenance import verify
from pulse.storage.sqlite.sessions import session_sums
from tests.storage.test_writer import BASE, ev, job, submit

PAGES = ["/", "/pricing", "/docs"]


def _recount(sent: list[tuple[str, str | None, int, str, str | None]]) -> tuple[dict, dict]:
    """Per distinct id (events, first, last) and per session key (events, page views, first, last, entry path,
    exit path), from the events sent: (user, session key, ts, name, path)."""
    persons: dict[str, list] = {}
    sessions: dict[str, list] = {}
    for user, session, ts, name, path in sent:
        person = persons.setdefault(user, [0, ts, ts])
        person[0] += 1
        person[1], person[2] = min(person[1], ts), max(person[2], ts)
        if session is None:
            continue
        row = sessions.setdefault(session, [0, 0, ts, ts, None, None])
        row[0] += 1
        row[2], row[3] = min(row[2], ts), max(row[3], ts)
        if name == "page_view":
            row[1] += 1
    for session, row in sessions.items():  # entry: the earliest page view; exit: the latest (later sent on ties)
        views = [(ts, order, path) for order, (_, key, ts, name, path) in enumerate(sent)
                 if key == session and name == "page_view"]
        if views:
            row[4] = min(views, key=lambda v: (v[0], v[1]))[2]
            row[5] = max(views, key=lambda v: (v[0], v[1]))[2]
    return ({user: tuple(row) for user, row in persons.items()},
            {key: tuple(row) for key, row in sessions.items()})


def _stored(conn, project_id: int) -> tuple[dict, dict]:
    persons = {distinct_id: (count, first, last) for distinct_id, count, first, last in conn.execute(
        "SELECT distinct_id, event_count, first_seen, last_seen FROM persons WHERE project_id = ?", (project_id,))}
    sessions = {key: (events, views, first, last, entry, exit_) for key, events, views, first, last, entry, exit_
                in conn.execute(
        "SELECT s.session_key, s.events, s.pageviews, s.first_ts, s.last_ts, en.value, ex.value FROM sessions s"
        " LEFT JOIN strings en ON en.id = s.entry_path_id LEFT JOIN strings ex ON ex.id = s.exit_path_id"
        " WHERE s.project_id = ?", (project_id,))}
    return persons, sessions


def test_sessions_and_persons_written_in_slices_survive_a_crash_at_any_commit(db, project, monkeypatch):
    """Many persons and sessions, seen again and again out of order; the kept changes are sealed at once and
    written three rows a commit, so most commits write part of a generation while the next gathers. The
    writer dies after random commits (a new one replays the events after the marks). Flushed at the end,
    every session and person equals the recount, and verify finds nothing at any commit in between."""
    monkeypatch.setattr(applier_module, "ROWS_AFTER_S", 0.0)
    monkeypatch.setattr(applier_module, "SLICE_ROWS", 3)
    monkeypatch.setattr(identities, "CACHE_LIMIT", 5)  # the caches change generation every few commits
    rng = random.Random(11)
    sent: list[tuple[str, str | None, int, str, str | None]] = []
    applier = BatchApplier(db)
    sliced = crashes = 0
    for commit in range(60):
        events = []
        for _ in range(rng.randrange(1, 12)):
            user = f"u{rng.randrange(25)}"
            session = f"s{rng.randrange(40)}" if rng.random() < 0.8 else None  # some inferred
            name = rng.choice(["page_view", "page_view", "click"])
            path = rng.choice(PAGES)
            ts = BASE + rng.randrange(2 * HOUR_MS)
            events.append(ev(name, ts, user, session, page_url=f"https://site.example{path}"))
        with db:
            applier.apply(submit(job(project.id, events)), flush=False)
        for item in events:
            key = item.session_id
            sent.append((item.distinct_id, key, item.timestamp, item.event,
                         item.page_url.removeprefix("https://site.example")))
        sliced += bool(applier.kept.sealed_persons or applier.kept.sealed_sessions)
        assert verify(db, [project]) == []
        if rng.random() < 0.25:  # the writer dies: what it kept is gone, and the next one replays
            applier = BatchApplier(db)
            crashes += 1
    assert sliced > 10 and crashes > 5  # the test went where it means to
    with db:
        applier.apply([], flush=True)
    assert verify(db, [project]) == []
    assert db.execute("SELECT value FROM meta WHERE key = 'rows_through'").fetchone()[0] == \
        db.execute("SELECT max(id) FROM events").fetchone()[0]

    persons, sessions = _stored(db, project.id)
    expected_persons, expected_sessions = _recount(sent)
    assert persons == expected_persons
    keyed = {key: row for key, row in sessions.items() if not key.startswith(identities.INFERRED)}
    assert keyed == expected_sessions
    inferred_events = sum(row[0] for key, row in sessions.items() if key.startswith(identities.INFERRED))
    assert inferred_events == sum(1 for _, key, _, _, _ in sent if key is None)


def test_a_read_flush_writes_the_sealed_and_the_gathering_changes(db, project, monkeypatch):
    """With a generation half written and newer changes gathering, a flush (what a read asks for) writes both:
    every row is whole, and the marks say so."""
    monkeypatch.setattr(applier_module, "ROWS_AFTER_S", 3600.0)
    monkeypatch.setattr(applier_module, "ROWS_LIMIT", 40)  # sealed after three commits of 16 rows
    monkeypatch.setattr(applier_module, "SLICE_ROWS", 2)  # each commit then writes 16 of them (its own events')
    applier = BatchApplier(db)
    sent = []
    for commit in range(4):
        events = [ev("page_view", BASE + commit * 60_000 + i, f"u{commit}-{i}", f"s{commit}-{i}", uid=uuid.uuid4(),
                     page_url="https://site.example/") for i in range(8)]
        with db:
            applier.apply(submit(job(project.id, events)), flush=False)
        sent += [(e.distinct_id, e.session_id, e.timestamp, e.event, "/") for e in events]
    assert applier.kept.sealed_persons or applier.kept.sealed_sessions
    assert applier.kept.persons and applier.kept.sessions
    with db:
        applier.apply([], flush=True)
    assert not (applier.kept.sealed_persons or applier.kept.sealed_sessions or applier.kept.persons
                or applier.kept.sessions)
    assert _stored(db, project.id) == _recount(sent)
    assert verify(db, [project]) == []


def test_a_read_under_load_is_answered_once_its_events_are_written_a_slice_at_a_time(db, project, monkeypatch):
    """A Flush (a read's) taken while rows are kept is answered by the first commit after which every change of
    the events stored before it is written; the commits in between go on taking requests and each writes a
    slice, so none waits for all of it. Every row is then whole for the events the read must count."""
    from pulse.storage.sqlite.wire import Committed, Flush
    from pulse.storage.sqlite.writer_process import write

    monkeypatch.setattr(applier_module, "ROWS_AFTER_S", 3600.0)  # nothing is sealed by age
    monkeypatch.setattr(applier_module, "DRAIN_SLICE_ROWS", 4)
    applier = BatchApplier(db)
    waiting: list[tuple[int, int]] = []
    rng = random.Random(5)
    sent = []

    def batch(job_id: int) -> list:
        events = [ev("page_view", BASE + rng.randrange(HOUR_MS), f"u{rng.randrange(30)}", f"s{rng.randrange(30)}",
                     page_url="https://site.example/") for _ in range(10)]
        sent.extend(events)
        return [msgspec.structs.replace(submit(job(project.id, events))[0], job_id=job_id)]

    for job_id in range(1, 6):
        outcome = write(db, applier, batch(job_id), False, waiting)
        assert isinstance(outcome, Committed)
    before = db.execute("SELECT max(id) FROM events").fetchone()[0]
    kept_rows = len(applier.kept.persons) + len(applier.kept.sessions)
    assert kept_rows > 8  # more than two slices: the read cannot be answered by the first commit
    answered_at = None
    for job_id in range(100, 120):
        jobs = batch(job_id) + ([Flush(99)] if job_id == 100 else [])
        outcome = write(db, applier, jobs, False, waiting)
        assert isinstance(outcome, Committed)
        assert job_id in [result[0] for result in outcome.results]  # requests go on being answered
        if 99 in [result[0] for result in outcome.results]:
            answered_at = job_id
            break
    assert answered_at is not None and answered_at > 100
    assert applier.written_through >= before
    assert verify(db, [project]) == []
    marks = db.execute("SELECT min(value) FROM meta WHERE key IN ('derived_through', 'rows_through')").fetchone()[0]
    assert marks >= before


def test_deleting_the_project_with_the_newest_events_hands_out_no_id_the_marks_cover(db, make_project):
    """The marks say which events are written; ids handed out after the newest events went with their project
    start above them, so the next events are kept, written, read and replayed like any others."""
    from pulse.storage.sqlite.projects import delete_project, get_project

    first, second = make_project("first"), make_project("second")
    applier = BatchApplier(db)
    with db:
        applier.apply(submit(job(first.id, [ev("page_view", BASE + i, "u1", "s1") for i in range(3)])), flush=True)
    with db:
        applier.apply(submit(job(second.id, [ev("page_view", BASE + i, "u2", "s2") for i in range(10)])),
                      flush=True)
    delete_project(db, get_project(db, second.id))
    with db:
        applier.apply(submit(job(first.id, [ev("page_view", BASE + 100 + i, "u1", "s1") for i in range(5)])),
                      flush=False)
    assert applier.unwritten > 0  # a read asks for them
    applier = BatchApplier(db)  # the writer died: the replay finds the five
    with db:
        applier.apply([], flush=True)
    assert verify(db, [get_project(db, first.id)]) == []
    events = db.execute("SELECT sum(events) FROM hourly WHERE project_id = ? AND name_id = 0",
                        (first.id,)).fetchone()[0]
    person = db.execute("SELECT event_count FROM persons WHERE project_id = ?", (first.id,)).fetchone()[0]
    assert (events, person) == (8, 8)


def test_commits_larger_than_a_slice_do_not_pile_up_sealed_changes(db, project, monkeypatch):
    """Every commit writes at least as many sealed rows as its own events may have changed, so under commits
    of new visitors larger than a slice what is sealed stays bounded and rows_through keeps up."""
    monkeypatch.setattr(applier_module, "ROWS_AFTER_S", 0.0)
    monkeypatch.setattr(applier_module, "SLICE_ROWS", 20)
    applier = BatchApplier(db)
    for commit in range(60):
        events = [ev("page_view", BASE + commit * 1000 + i, f"u{commit}-{i}", f"s{commit}-{i}")
                  for i in range(15)]  # 30 new rows a commit
        with db:
            applier.apply(submit(job(project.id, events)), flush=False)
        sealed = len(applier.kept.sealed_persons) + len(applier.kept.sealed_sessions)
        assert sealed <= 30, commit
    last = db.execute("SELECT max(id) FROM events").fetchone()[0]
    assert last - applier.kept.rows_through <= 30
    assert verify(db, [project]) == []


def test_a_day_read_between_two_commits_is_read_again_after_a_flush_with_no_new_event(db, project, settings,
                                                                                        monkeypatch):
    """A reader caches a whole day's sessions after the commit that stored their events and before the one that
    writes what they changed (a flush that stores no new event: a read's, or the idle one). That day's generation
    moves with the second commit too, so the next read counts the sessions again, whole."""
    monkeypatch.setattr(applier_module, "ROWS_AFTER_S", 3600.0)  # the changes stay kept until the flush
    applier = BatchApplier(db)
    views = [ev("page_view", BASE + i * 60_000, "u1", "s1", page_url="https://site.example/") for i in range(3)]
    with db:
        applier.apply(submit(job(project.id, [*views, ev("click", BASE + 5 * 60_000, "u2", "s2")])), flush=False)
    day = BASE // DAY_MS * DAY_MS
    window = Window(day, day + DAY_MS)  # a whole UTC day: its sessions come from the day cache
    cache = DayCache()
    reader = connect(settings.db_path, readonly=True)
    try:
        before = session_sums(Snapshot(reader, cache), project.id, window, Filters())
        with db:
            applier.apply([], flush=True)
        after = session_sums(Snapshot(reader, cache), project.id, window, Filters())
        # (sessions, bounces, duration ms, page views), recounted from what was sent: s1 3 views over 2 minutes,
        # s2 a single click
        assert after == (2, 1, 2 * 60_000, 3)
        assert before != after  # the first read did see the sessions before their changes were written
        assert session_sums(Snapshot(reader, DayCache()), project.id, window, Filters()) == after
    finally:
        reader.close()
    assert verify(db, [project]) == []
