"""The single writer: group commit, dedup, rollups that agree with a recount of the raw events."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import uuid

from pulse.protocol import IngestEvent
from pulse.storage.model import HOUR_MS, IngestJob
from pulse.storage.sqlite.rows import prepare
from pulse.storage.sqlite.wire import Flush, Submit, frame
from pulse.storage.sqlite.writer import EventWriter
from pulse.storage.sqlite.writer_process import Channel
from tests.conftest import recount_hourly, rollups

BASE = 1_790_000_000_000 - 1_790_000_000_000 % HOUR_MS  # an hour boundary


def job(project_id: int, events: list[IngestEvent], ua: str = "test-agent") -> IngestJob:
    return IngestJob(project_id, events, received_ms=BASE + 10 * HOUR_MS, skew_ms=0, ip="192.0.2.1", user_agent=ua)


def submit(j: IngestJob) -> list[Submit]:
    """The job as the writer process receives it, for a BatchApplier used directly."""
    return [Submit(1, j.project_id, j.received_ms, j.ip, j.user_agent, prepare(j))]


def ev(name: str, ts: int, user: str, session: str | None = None, uid: uuid.UUID | None = None, **kw) -> IngestEvent:
    return IngestEvent(event=name, uuid=uid or uuid.uuid4(), distinct_id=user, session_id=session, timestamp=ts, **kw)


async def test_rollups_agree_with_recount_after_many_batches(db, project, settings):
    writer = EventWriter(settings.db_path, synchronous="NORMAL")
    await writer.start()
    rng = random.Random(7)
    names = ["page_view", "click", "signup", "purchase"]
    sent = 0
    try:
        for _ in range(40):  # many batches, all hitting the same few hours
            events = [
                ev(rng.choice(names), BASE + rng.randrange(3 * HOUR_MS), f"user{rng.randrange(60)}",
                   f"s{rng.randrange(90)}")
                for _ in range(rng.randrange(1, 30))
            ]
            sent += len(events)
            ua = rng.choice(["test-agent", "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"])
            accepted, duplicates = await writer.submit(job(project.id, events, ua))
            assert (accepted, duplicates) == (len(events), 0)
    finally:
        await writer.close()
    expected = recount_hourly(db, project.id)
    stored = rollups(db, project.id)
    assert set(stored) == set(expected)
    for key, (count, users, sessions) in expected.items():
        assert stored[key][:3] == (count, users, sessions), key
        assert len(stored[key][3]) == users and len(stored[key][4]) == sessions
    assert sum(v[0] for k, v in stored.items() if k[1] == 0) == sent


async def test_duplicate_uuids_are_stored_and_counted_once(db, project, settings):
    writer = EventWriter(settings.db_path, synchronous="NORMAL")
    await writer.start()
    try:
        same = uuid.uuid4()
        first = [ev("click", BASE, "u1", "s1", uid=same), ev("click", BASE + 1, "u2", "s2", uid=same)]
        assert await writer.submit(job(project.id, first)) == (1, 1)  # duplicate inside one batch
        again = [ev("click", BASE + 5, "u3", "s3", uid=same), ev("click", BASE + 6, "u4", "s4")]
        assert await writer.submit(job(project.id, again)) == (1, 1)  # duplicate of a committed event
        # the same uuid under another project is a different event
        other = db.execute("INSERT INTO projects(name, created_at) VALUES ('other', 0) RETURNING id").fetchone()[0]
        assert await writer.submit(job(other, [ev("click", BASE, "u1", uid=same)])) == (1, 0)
    finally:
        await writer.close()
    assert db.execute("SELECT count(*) FROM events WHERE project_id = ?", (project.id,)).fetchone()[0] == 2
    stored = rollups(db, project.id)
    assert sum(v[0] for k, v in stored.items() if k[1] == 0) == 2
    assert db.execute("SELECT sum(event_count) FROM persons WHERE project_id = ?", (project.id,)).fetchone()[0] == 2


async def test_concurrent_submits_share_commits(db, project, settings):
    writer = EventWriter(settings.db_path, synchronous="FULL")
    await writer.start()
    try:
        jobs = [job(project.id, [ev("click", BASE + i, f"u{i}")]) for i in range(300)]
        results = await asyncio.gather(*(writer.submit(j) for j in jobs))
    finally:
        await writer.close()
    assert results == [(1, 0)] * 300
    assert writer.stats.commits < 300  # requests waiting together were committed together
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 300


async def test_identify_links_anonymous_id_to_one_person(db, project, settings):
    writer = EventWriter(settings.db_path, synchronous="NORMAL")
    await writer.start()
    try:
        await writer.submit(job(project.id, [ev("page_view", BASE, "anon-1", "s1")]))
        await writer.submit(job(project.id, [
            ev("$identify", BASE + 10, "user_42", "s1", anon_id="anon-1", traits={"gender": "Female"}),
            ev("purchase", BASE + 20, "user_42", "s1"),
        ]))
        await writer.submit(job(project.id, [ev("page_view", BASE + 30, "anon-1", "s1")]))
    finally:
        await writer.close()
    persons = db.execute("SELECT distinct_id, event_count, traits FROM persons WHERE project_id = ?",
                         (project.id,)).fetchall()
    assert persons == [("user_42", 4, '{"gender":"Female"}')]
    assert rollups(db, project.id)[(BASE // HOUR_MS, 0, 0)][1] == 1


async def test_sessions_track_entry_exit_and_counts(db, project, settings):
    writer = EventWriter(settings.db_path, synchronous="NORMAL")
    await writer.start()
    try:
        await writer.submit(job(project.id, [
            ev("page_view", BASE + 2000, "u1", "s1", page_url="https://site.example/pricing"),
            ev("click", BASE + 2500, "u1", "s1"),
        ]))
        # an earlier page view arriving later becomes the entry page
        await writer.submit(job(project.id, [
            ev("page_view", BASE + 1000, "u1", "s1", page_url="https://site.example/?utm_source=news",
               referrer="https://www.google.com/search?q=x"),
            ev("page_view", BASE + 9000, "u1", "s1", page_url="https://site.example/signup"),
        ]))
    finally:
        await writer.close()
    row = db.execute(
        "SELECT s.first_ts, s.last_ts, s.events, s.pageviews, entry.value, exit.value, ref.value, src.value"
        " FROM sessions s JOIN strings entry ON entry.id = s.entry_path_id JOIN strings exit ON exit.id = s.exit_path_id"
        " LEFT JOIN strings ref ON ref.id = s.referrer_id LEFT JOIN strings src ON src.id = s.utm_source_id"
    ).fetchone()
    assert row == (BASE + 1000, BASE + 9000, 4, 3, "/", "/signup", "google.com", "news")


async def test_sessions_agree_with_recount_when_batches_arrive_out_of_order(db, project, settings):
    # batches in random order: sessions are extended later and earlier, with and without page views
    site = "https://site.example"
    rng = random.Random(5)
    events = [
        ev(rng.choice(["page_view", "click"]), BASE + rng.randrange(2 * HOUR_MS), f"u{s % 7}", f"s{s}",
           page_url=f"{site}/p{rng.randrange(5)}")
        for s in (rng.randrange(12) for _ in range(400))
    ]
    rng.shuffle(events)
    writer = EventWriter(settings.db_path, synchronous="NORMAL")
    await writer.start()
    try:
        for start in range(0, len(events), 9):
            await writer.submit(job(project.id, events[start:start + 9]))
    finally:
        await writer.close()
    expected = {}
    for key in {e.session_id for e in events}:
        mine = sorted((e.timestamp, e.event, e.page_url) for e in events if e.session_id == key)
        views = [m for m in mine if m[1] == "page_view"]
        expected[key] = (mine[0][0], mine[-1][0], len(mine), len(views), views[0][2].removeprefix(site),
                         views[-1][2].removeprefix(site))
    rows = db.execute(
        "SELECT s.session_key, s.first_ts, s.last_ts, s.events, s.pageviews, entry.value, exit.value FROM sessions s"
        " JOIN strings entry ON entry.id = s.entry_path_id JOIN strings exit ON exit.id = s.exit_path_id"
        " WHERE s.project_id = ?", (project.id,)).fetchall()
    assert {key: tuple(rest) for key, *rest in rows} == expected
    first = db.execute("SELECT min(first_ts), count(*) FROM sessions INDEXED BY sessions_project_first"
                       " WHERE project_id = ?", (project.id,)).fetchone()
    assert first == (min(e.timestamp for e in events), len(expected))


def test_compaction_keeps_totals_and_leaves_one_row_per_key(db, project):
    from pulse.storage.sqlite.applier import BatchApplier

    applier = BatchApplier(db)
    rng = random.Random(11)
    for _ in range(30):
        events = [ev("click" if rng.random() < 0.5 else "page_view", BASE + rng.randrange(2 * HOUR_MS),
                     f"u{rng.randrange(40)}", f"s{rng.randrange(70)}") for _ in range(20)]
        with db:
            applier.apply(submit(job(project.id, events)))
    before = rollups(db, project.id)
    assert db.execute("SELECT count(*) FROM hourly").fetchone()[0] > len(before)
    with db:
        assert applier.compact() >= len(before)
    assert db.execute("SELECT count(*) FROM hourly").fetchone()[0] == len(before)
    assert rollups(db, project.id) == before
    assert {k: v[:3] for k, v in before.items()} == recount_hourly(db, project.id)
    with db:  # keys loaded from several rows after a restart are compacted too
        applier.reset()
        applier.apply(submit(job(project.id, [ev("click", BASE, "u999", "s999")])))
    assert {k: v[:3] for k, v in rollups(db, project.id).items()} == recount_hourly(db, project.id)


def sessions_and_persons(db, project_id: int) -> tuple[dict, dict]:
    """Stored sessions by key and persons by distinct id, and the same recounted from the raw events."""
    stored_sessions = {key: (first, last, events, views) for key, first, last, events, views in db.execute(
        "SELECT session_key, first_ts, last_ts, events, pageviews FROM sessions WHERE project_id = ?", (project_id,))}
    recounted_sessions = {key: (first, last, events, views) for key, first, last, events, views in db.execute(
        "SELECT s.session_key, min(e.ts), max(e.ts), count(*), sum(n.value = 'page_view') FROM events e"
        " JOIN sessions s ON s.id = e.session_id JOIN strings n ON n.id = e.name_id WHERE e.project_id = ?"
        " GROUP BY 1", (project_id,))}
    stored_persons = {user: (first, last, events) for user, first, last, events in db.execute(
        "SELECT distinct_id, first_seen, last_seen, event_count FROM persons WHERE project_id = ?", (project_id,))}
    recounted_persons = {user: (first, last, events) for user, first, last, events in db.execute(
        "SELECT p.distinct_id, min(e.ts), max(e.ts), count(*) FROM events e JOIN persons p ON p.id = e.person_id"
        " WHERE e.project_id = ? GROUP BY 1", (project_id,))}
    return (stored_sessions, stored_persons), (recounted_sessions, recounted_persons)


async def test_after_settle_rollups_sessions_and_persons_count_every_acknowledged_event_while_others_keep_writing(
        db, project, make_project, settings):
    other = make_project("other")
    writer = EventWriter(settings.db_path, synchronous="NORMAL")
    await writer.start()
    rng = random.Random(5)
    stop = asyncio.Event()

    async def others() -> None:  # steady traffic of other visitors: the writer is never idle for long
        while not stop.is_set():
            await writer.submit(job(other.id, [
                ev("page_view", BASE + rng.randrange(HOUR_MS), f"other{rng.randrange(50)}", f"o{rng.randrange(80)}",
                   page_url=f"https://site.example/o/{rng.randrange(9)}") for _ in range(10)]))

    background = [asyncio.create_task(others()) for _ in range(3)]
    try:
        mine: list[IngestEvent] = []
        for round_ in range(15):
            batch = [ev(rng.choice(["page_view", "click"]), BASE + rng.randrange(2 * HOUR_MS), f"me{rng.randrange(6)}",
                        f"m{rng.randrange(8)}", page_url=f"https://site.example/m/{rng.randrange(5)}")
                     for _ in range(rng.randrange(1, 12))]
            assert await writer.submit(job(project.id, batch)) == (len(batch), 0)
            mine += batch
            await writer.settle()
            stored, expected = sessions_and_persons(db, project.id)
            assert stored == expected, round_
            assert {k: v[:3] for k, v in rollups(db, project.id).items()} == recount_hourly(db, project.id), round_
    finally:
        stop.set()
        await asyncio.gather(*background)
        await writer.close()
    # closing wrote what was kept: every rollup, session and person agrees with the events
    for project_id in (project.id, other.id):
        stored, expected = sessions_and_persons(db, project_id)
        assert stored == expected
        assert {k: v[:3] for k, v in rollups(db, project_id).items()} == recount_hourly(db, project_id)


def test_changes_kept_in_memory_are_rebuilt_from_the_events_after_a_crash_and_a_rollback(db, project):
    from pulse.storage.sqlite.applier import BatchApplier

    rng = random.Random(3)

    def batch() -> list[IngestEvent]:
        return [ev(rng.choice(["page_view", "click"]), BASE + rng.randrange(2 * HOUR_MS), f"u{rng.randrange(30)}",
                   f"s{rng.randrange(40)}",
                   page_url=f"https://site.example/p/{rng.randrange(6)}?utm_source=n{rng.randrange(3)}")
                for _ in range(15)]

    applier = BatchApplier(db)
    for _ in range(10):
        with db:
            applier.apply(submit(job(project.id, batch())), flush=False)
    stored, expected = sessions_and_persons(db, project.id)
    assert stored != expected  # the tables lag: new sessions and persons hold no events yet
    assert all(events == 0 for _, _, events, _ in stored[0].values())
    assert rollups(db, project.id) == {}  # and no rollup row is written yet

    # the writer dies with its changes in memory; the next one rebuilds them from the events
    applier = BatchApplier(db)
    assert applier.unwritten > 0
    with db:
        applier.apply(submit(job(project.id, batch())), flush=False)
    # a transaction that fails after apply() is rolled back; reset() drops its changes with it
    db.execute("BEGIN IMMEDIATE")
    applier.apply(submit(job(project.id, batch())), flush=False)
    db.execute("ROLLBACK")
    applier.reset()
    with db:
        applier.apply([], flush=True)
    assert applier.unwritten == 0
    stored, expected = sessions_and_persons(db, project.id)
    assert stored == expected
    assert {k: v[:3] for k, v in rollups(db, project.id).items()} == recount_hourly(db, project.id)
    # entry and exit pages and their UTM source agree with a recount too
    from pulse.storage.sqlite.maintenance import verify
    assert [str(d) for d in verify(db)] == []
    entries = db.execute(
        "SELECT s.session_key, src.value FROM sessions s LEFT JOIN strings src ON src.id = s.utm_source_id").fetchall()
    first_views = {}
    for key, url, ts in db.execute(
            "SELECT s.session_key, u.value, e.ts FROM events e JOIN sessions s ON s.id = e.session_id"
            " JOIN strings u ON u.id = e.url_id JOIN strings n ON n.id = e.name_id"
            " WHERE n.value = 'page_view' ORDER BY e.ts, e.id"):
        first_views.setdefault(key, url.rsplit("=", 1)[1])
    assert {key: source for key, source in entries if key in first_views} == first_views


def test_a_request_that_finds_the_writer_idle_is_taken_without_waiting_for_more():
    """The writer, blocked on an idle socket, takes what arrives and goes on to commit it.

    It used to wait up to its idle-flush period for a second message after the first, so every
    request on a quiet server was answered 50 ms late. Here the period is long and the server's end
    closes after a few seconds: a channel that waited would see the close and report it.
    """
    ours, theirs = socket.socketpair()
    channel = Channel(theirs)
    closer = threading.Timer(10.0, ours.close)
    closer.start()
    try:
        ours.sendall(frame(Flush(1)))
        messages = channel.receive(block=True, timeout=3600.0)
        assert messages == [Flush(1)]
        assert not channel.closed
    finally:
        closer.cancel()
        ours.close()
        theirs.close()
