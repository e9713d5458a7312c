"""The event columns: segments that hold exactly the table's non-bot events, kept exact through merges, restarts,
prunes and deleted projects, and `column_scans.matched` against a plain recount of what was sent.

Events are written by the real writer (or posted to the real server) into a real database; the builder's passes
are run one at a time (`build_once`) so that what each test sees never depends on when a thread ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest

from pulse.protocol import IngestEvent
from pulse.server.app import create_app
from pulse.server.keys import STORE
from pulse.storage.model import DAY_MS, HOUR_MS, Filters, IngestJob
from pulse.storage.sqlite import column_scans, columns
from pulse.storage.sqlite.columns import FIELDS, ColumnIndex
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.day_cache import DayCache, Snapshot
from pulse.storage.sqlite.maintenance import prune
from pulse.storage.sqlite.projects import create_project, delete_project, get_project
from pulse.storage.sqlite.schema import migrate
from pulse.storage.sqlite.writer import EventWriter
from tests.server.test_analytics import AGENTS, BOT  # user agent -> (browser, os, device); a crawler

BASE = 1_790_000_000_000 - 1_790_000_000_000 % HOUR_MS  # an hour boundary
PAGES = ["/", "/pricing", "/docs", "/blog/launch"]
REFERRERS = {None: None, "https://www.google.com/search?q=pulse": "google.com",
             "https://news.ycombinator.com/item?id=1": "news.ycombinator.com"}
COUNTRIES = [None, "GB", "DE", "IN"]
LANGUAGES = {None: None, "en": "en", "de-AT": "de"}  # an event's own tag is cut to its base
SCREENS = {None: None, 390: "mobile", 800: "tablet", 1200: "laptop", 1920: "desktop"}
UTMS = [(None, None, None), ("news", "email", "launch"), ("ads", "cpc", "launch"), ("ads", None, None)]
# property values of every kind: text, integers, floats, booleans, JSON null (a key with no value), a nested
# object; keys with dots, quotes, a backslash and letters outside ASCII
PROP_CHOICES = {
    "plan": ["free", "pro", "1", ""],
    "n": [0, 1, 7, -3, 12_345_678_901],
    "ratio": [1.5, 0.25, -2.75],
    "ok": [True, False],
    "maybe": [None, "yes"],
    "nested": [{"a": [1, "b"]}, {"deep": {"x": None}}],
    "a.b": ["dotted", "x"],
    'say "hi"': ["quoted", "q2"],
    "back\\slash": ["bs"],
    "größe": ["groß", "klein"],
    "ключ": ["значение"],
}


@dataclass
class Sent:
    """One event as sent, with what each filter should see of it."""

    uid: str
    project: int
    ts: int
    name: str
    user: int
    bot: bool
    path: str | None = None
    referrer: str | None = None
    utm: tuple = (None, None, None)  # of the event's session: its first page view's
    agent: tuple = (None, None, None)  # browser, os, device
    country: str | None = None
    language: str | None = None
    screen: str | None = None
    props: dict = field(default_factory=dict)
    traits: dict = field(default_factory=dict)


def prop_text(value) -> str | None:
    """A property's value as text, the way a filter compares it (None: the event does not have the key)."""
    if value is None:
        return None
    if value is True or value is False:
        return "1" if value else "0"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def json_path(key: str) -> str:
    """A JSON path naming a top-level key, escaped as SQLite reads a quoted label."""
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def generate(project: int, users: int, seed: int, hours: int = 30) -> tuple[list[IngestJob], list[Sent]]:
    """One job per session (one user agent, country and request language each), events in time order, and bots."""
    rng = random.Random(seed)
    jobs, sent = [], []
    for user in range(users):
        ua = rng.choice(list(AGENTS))
        traits = {"gender": rng.choice(["Male", "Female", "Other"]), "age": rng.choice([20, 30, 40])}
        country = rng.choice(COUNTRIES)
        for number in range(rng.randint(1, 3)):
            session = f"p{project}-u{user}-s{number}"
            ts = BASE + rng.randrange(hours * HOUR_MS)
            utm = rng.choice(UTMS)
            request_language = rng.choice([None, "en"])  # the server passes the header's base
            events, items = [], []
            for step in range(rng.randint(1, 6)):
                own_language = rng.choice([None, "de-AT"])
                width = rng.choice(list(SCREENS))
                common = dict(uuid=uuid.uuid4(), distinct_id=f"u{user}", session_id=session, timestamp=ts,
                              language=own_language, screen_width=width)
                item = Sent(str(common["uuid"]), project, ts, "", user, False, agent=AGENTS[ua], country=country,
                            language=LANGUAGES[own_language] if own_language else request_language, screen=SCREENS[width],
                            traits=traits)
                if step == 0 and number == 0:
                    event = IngestEvent(event="$identify", traits=traits, **common)
                    item.name = "$identify"
                elif step == 0 or rng.random() < 0.4:
                    path = rng.choice(PAGES)
                    query = "&".join(f"utm_{k}={v}" for k, v in zip(("source", "medium", "campaign"), utm) if v)
                    referrer = rng.choice(list(REFERRERS))
                    event = IngestEvent(event="page_view", page_url=f"https://site.example{path}"
                                        + (f"?{query}" if query and step == 0 else ""), referrer=referrer, **common)
                    item.name, item.path, item.referrer = "page_view", path, REFERRERS[referrer]
                else:
                    props = {key: rng.choice(values) for key, values in PROP_CHOICES.items() if rng.random() < 0.6}
                    event = IngestEvent(event=rng.choice(["click", "signup", "purchase"]), properties=props or None,
                                        **common)
                    item.name, item.props = event.event, props
                events.append(event)
                items.append(item)
                ts += rng.randrange(60_000, 900_000)
            for item in items:  # a session's UTM values are its first page view's: step 0's but in the first
                item.utm = utm if number > 0 else (None,) * 3
            jobs.append(IngestJob(project, events, BASE + hours * HOUR_MS, 0, "192.0.2.1", ua, country=country,
                                  language=request_language))
            sent += items
    for i in range(12):  # a crawler: stored, never in the columns
        ts = BASE + rng.randrange(hours * HOUR_MS)
        uid = uuid.uuid4()
        jobs.append(IngestJob(project, [IngestEvent(event="page_view", uuid=uid, distinct_id="crawler",
                                                    page_url="https://site.example/", properties={"plan": "pro"},
                                                    timestamp=ts)],
                              BASE + hours * HOUR_MS, 0, "192.0.2.9", BOT, country="GB"))
        sent.append(Sent(str(uid), project, ts, "page_view", -1, True, path="/", props={"plan": "pro"}))
    rng.shuffle(jobs)  # sessions arrive out of time order, as they do
    return jobs, sent


async def write(path, jobs: list[IngestJob]) -> None:
    writer = EventWriter(path, synchronous="NORMAL")
    await writer.start()
    try:
        for job in jobs:
            accepted, duplicates = await writer.submit(job)
            assert (accepted, duplicates) == (len(job.events), 0)
    finally:
        await writer.close()


def build_all(index: ColumnIndex, path) -> int:
    """Run the builder's passes until it has caught up; how many passes."""
    conn = connect(path, readonly=True)
    try:
        index._open()
        passes = 1
        while index.build_once(conn):
            passes += 1
        return passes
    finally:
        conn.close()


def table_rows(conn, project: int) -> np.ndarray:
    """The project's non-bot events as the columns hold them, in id order."""
    return np.array(conn.execute(
        "SELECT " + ", ".join(FIELDS.values()) + " FROM events e LEFT JOIN agents a ON a.id = e.agent_id"
        " WHERE e.project_id = ? AND coalesce(a.is_bot, 0) = 0 ORDER BY e.id", (project,)).fetchall(),
        dtype=np.int64).reshape(-1, len(FIELDS))


def table_props(conn, project: int) -> dict[tuple[int, str], str]:
    """(event id, key) -> the value as text, for every key of every non-bot event (None for a JSON null)."""
    found = {}
    for event_id, props in conn.execute(
            "SELECT e.id, e.props FROM events e LEFT JOIN agents a ON a.id = e.agent_id"
            " WHERE e.project_id = ? AND coalesce(a.is_bot, 0) = 0 AND e.props IS NOT NULL", (project,)):
        for key, value in json.loads(props).items():
            text = conn.execute("SELECT CAST(json_extract(?, ?) AS TEXT)", (props, json_path(key))).fetchone()[0]
            assert text == prop_text(value), (key, value, text)  # the recount's text is SQLite's (None for null)
            found[(event_id, key)] = text
    return found


def segment_rows(segments) -> tuple[np.ndarray, dict[tuple[int, str], str]]:
    """Every row of the segments as (FIELDS...) in id order, and their properties by (event id, key)."""
    parts, props = [], {}
    for segment in segments:
        ts, ids = np.asarray(segment.cols["ts"]), np.asarray(segment.cols["id"])
        assert np.all((ts[1:] > ts[:-1]) | ((ts[1:] == ts[:-1]) & (ids[1:] > ids[:-1]))), "not in (ts, id) order"
        assert ids.size == 0 or (segment.lo <= ids.min() and ids.max() <= segment.hi)
        parts.append(np.stack([np.asarray(segment.cols[name]).astype(np.int64) for name in FIELDS], axis=1))
        for key, prop in segment.props.items():
            rows = np.asarray(prop.rows)
            assert np.all(rows[1:] > rows[:-1]), "a key's rows are not ascending"
            for row, code in zip(rows.tolist(), np.asarray(prop.codes).tolist()):
                assert (int(ids[row]), key) not in props
                props[(int(ids[row]), key)] = prop.values[code]
    rows = np.concatenate(parts) if parts else np.empty((0, len(FIELDS)), dtype=np.int64)
    return rows[np.argsort(rows[:, 0], kind="stable")], props


def assert_columns_equal_table(index: ColumnIndex, path, projects: list[int]) -> None:
    conn = connect(path, readonly=True)
    try:
        through = conn.execute("SELECT max(id) FROM events").fetchone()[0]
        assert index.view.through == through
        for project in projects:
            rows, props = segment_rows(index.view.segments.get(project, ()))
            expected = table_rows(conn, project)
            assert len(expected) > 0
            assert rows.shape == expected.shape and np.array_equal(rows, expected)
            assert props == table_props(conn, project)
        assert set(index.view.segments) <= set(projects)
    finally:
        conn.close()


@pytest.fixture
def two_projects(db, make_project):
    return make_project("site").id, make_project("other").id


@pytest.fixture
def population(two_projects):
    first, second = two_projects
    jobs, sent = generate(first, 40, seed=3)
    other_jobs, other_sent = generate(second, 10, seed=4)
    return jobs + other_jobs, sent + other_sent


# -- the builder ---------------------------------------------------------------------------------------------------


async def test_segments_hold_every_non_bot_event_with_its_properties(settings, two_projects, population, tmp_path):
    jobs, sent = population
    await write(settings.db_path, jobs)
    index = ColumnIndex(settings.db_path, tmp_path / "columns")
    build_all(index, settings.db_path)
    assert_columns_equal_table(index, settings.db_path, list(two_projects))
    # and against what was sent: every non-bot event once, with every key (None for a JSON null)
    conn = connect(settings.db_path, readonly=True)
    uids = dict(conn.execute("SELECT id, lower(hex(uuid)) FROM events"))
    conn.close()
    rows, props = segment_rows(index.view.segments[two_projects[0]])
    expected = [s for s in sent if s.project == two_projects[0] and not s.bot]
    assert sorted(uids[i].replace("-", "") for i in rows[:, 0].tolist()) == sorted(
        s.uid.replace("-", "") for s in expected)
    by_uid = {s.uid.replace("-", ""): s for s in expected}
    assert props == {(i, key): prop_text(value) for i in rows[:, 0].tolist()
                     for key, value in by_uid[uids[i]].props.items()}
    assert any(key == 'say "hi"' for _, key in props) and any(value == "1" for value in props.values())


async def test_server_builds_columns_of_what_it_was_sent(aiohttp_client, settings, project):
    """Posted through the real server (its user-agent parsing tells the crawler apart), built by its own thread."""
    client = await aiohttp_client(create_app(settings))
    rng = random.Random(11)
    for agent in [*AGENTS, BOT, *AGENTS]:  # the crawler's 20 are stored, not built
        events = [{"event": rng.choice(["page_view", "click"]), "uuid": str(uuid.uuid4()), "distinct_id": f"u{i}",
                   "session_id": f"s{i}", "page_url": f"https://site.example{rng.choice(PAGES)}",
                   "timestamp": BASE + rng.randrange(5 * HOUR_MS),
                   "properties": {"plan": rng.choice(["free", "pro"]), "n": i, "ok": i % 2 == 0, "gone": None}}
                  for i in range(20)]
        response = await client.post("/api/v1/events/ingest", json={"events": events},
                                     headers={"X-API-Key": project.ingest_key, "User-Agent": agent})
        assert response.status == 202, await response.text()
    store = client.app[STORE]
    await store._settle()
    conn = connect(settings.db_path, readonly=True)
    highest = conn.execute("SELECT max(id) FROM events").fetchone()[0]
    bots = conn.execute("SELECT count(*) FROM events e JOIN agents a ON a.id = e.agent_id WHERE a.is_bot = 1"
                        ).fetchone()[0]
    conn.close()
    assert bots == 20
    for _ in range(600):  # the builder's thread catches up within its interval; bounded, never timed
        if store.columns.view.through == highest:
            break
        store.columns.poke()
        await asyncio.sleep(0.05)
    assert_columns_equal_table(store.columns, settings.db_path, [project.id])
    assert sum(s.rows for s in store.columns.view.segments[project.id]) == 120


async def test_tiered_merges_keep_every_row(settings, two_projects, population, tmp_path, monkeypatch):
    jobs, _ = population
    await write(settings.db_path, jobs)
    monkeypatch.setattr(columns, "BUILD_ROWS", 7)  # many small passes, merged as they come
    index = ColumnIndex(settings.db_path, tmp_path / "columns")
    passes = build_all(index, settings.db_path)
    segments = index.view.segments[two_projects[0]]
    assert len(segments) < passes / 2  # they were merged
    assert max(s.rows for s in segments) > 7 * columns.MERGE_FANOUT  # and merged again
    assert_columns_equal_table(index, settings.db_path, list(two_projects))
    # only the segments the manifest names are on disk
    on_disk = {p.name for p in index.directory.iterdir() if p.is_dir()}
    assert on_disk == {s.name for parts in index.view.segments.values() for s in parts}


# -- restarts --------------------------------------------------------------------------------------------------


async def caught_up(index: ColumnIndex, path) -> None:
    """Poke the builder process until its manifest names every event (bounded, never timed)."""
    conn = connect(path, readonly=True)
    highest = conn.execute("SELECT max(id) FROM events").fetchone()[0]
    conn.close()
    for _ in range(1200):
        if index.view.through == highest:
            return
        index.poke()
        await asyncio.sleep(0.05)
    raise AssertionError(f"the builder did not reach event {highest}: {index.view.through}")


async def test_a_builder_that_dies_is_started_again_and_builds_on(settings, two_projects, population, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(columns, "RESTART_AFTER_S", 0.05)
    jobs, _ = population
    await write(settings.db_path, jobs[:25])
    index = ColumnIndex(settings.db_path, tmp_path / "columns", interval_s=0.1)
    index.start()
    try:
        await caught_up(index, settings.db_path)
        first = index._process
        first.kill()  # as the kernel's OOM killer would
        first.wait()
        for _ in range(600):
            if index._process is not first and index._process is not None and index._process.poll() is None:
                break
            await asyncio.sleep(0.05)
        assert index.restarts == 1 and index._process is not first
        await write(settings.db_path, jobs[25:])  # built by the new process, on top of what the first one built
        await caught_up(index, settings.db_path)
        assert_columns_equal_table(index, settings.db_path, list(two_projects))
    finally:
        index.stop()
    assert index._process is None and first.returncode is not None
    await asyncio.sleep(0.2)  # longer than the restart delay: a stopped builder stays stopped
    assert index._process is None and index.restarts == 1


def _files(directory) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_ino for p in directory.rglob("*.npy")}


async def test_restart_loads_the_manifest_and_builds_only_what_is_new(settings, two_projects, population,
                                                                      tmp_path):
    jobs, _ = population
    await write(settings.db_path, jobs[:-20])
    directory = tmp_path / "columns"
    first = ColumnIndex(settings.db_path, directory)
    build_all(first, settings.db_path)
    built = _files(directory)
    (directory / "p9-1-5").mkdir()  # a segment no manifest names, and a segment left half-written
    (directory / ".p1-1-2.999.tmp").mkdir()
    await write(settings.db_path, jobs[-20:])

    again = ColumnIndex(settings.db_path, directory)
    again._open()
    assert again.view.through == first.view.through  # loaded, not rebuilt
    assert {p: [s.name for s in parts] for p, parts in again.view.segments.items()} == {
        p: [s.name for s in parts] for p, parts in first.view.segments.items()}
    assert not (directory / "p9-1-5").exists() and not (directory / ".p1-1-2.999.tmp").exists()
    build_all(again, settings.db_path)
    now = _files(directory)
    kept = {name: inode for name, inode in built.items() if name in now}
    assert kept and all(now[name] == inode for name, inode in kept.items())  # the files built before, untouched
    assert_columns_equal_table(again, settings.db_path, list(two_projects))


async def test_another_database_at_the_same_path_is_rebuilt(settings, db, two_projects, population, tmp_path):
    jobs, _ = population
    await write(settings.db_path, jobs)
    directory = tmp_path / "columns"
    build_all(ColumnIndex(settings.db_path, directory), settings.db_path)

    # another database (fewer events of other sessions) put in its place, as a restore does
    other = tmp_path / "restored" / "pulse.db"
    other.parent.mkdir()
    conn = connect(other)
    migrate(conn)
    create_project(conn, "site")
    create_project(conn, "other")
    conn.close()
    others, _ = generate(two_projects[0], 8, seed=99)
    await write(other, others)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{settings.db_path}{suffix}"):
            os.remove(f"{settings.db_path}{suffix}")
    shutil.move(other, settings.db_path)

    index = ColumnIndex(settings.db_path, directory)
    build_all(index, settings.db_path)
    assert_columns_equal_table(index, settings.db_path, [two_projects[0]])
    assert not index.view.segments.get(two_projects[1])


# -- prune and deleted projects ----------------------------------------------------------------------------------


def snapshot(path, index: ColumnIndex | None) -> Snapshot:
    return Snapshot(connect(path, readonly=True), DayCache(), index)


def matched_ids(path, index, project: int, start: int, end: int, filters: Filters = Filters()) -> set[str] | None:
    """The uuids (hex) of the events `matched` finds; None when the columns cannot answer."""
    snap = snapshot(path, index)
    try:
        found = column_scans.matched(snap, project, start, end, filters)
        if found is None:
            return None
        uids = dict(snap.conn.execute("SELECT id, lower(hex(uuid)) FROM events"))
        ids = found.column("id").tolist()
        assert len(ids) == len(set(ids)) == len(found)
        assert all(i in uids for i in ids), "an event no longer in the table"
        return {uids[i] for i in ids}
    finally:
        snap.conn.close()


def hexed(sent: list[Sent]) -> set[str]:
    return {s.uid.replace("-", "") for s in sent}


async def test_pruned_rows_are_never_read_and_merges_drop_them(settings, db, two_projects, population, tmp_path,
                                                             monkeypatch):
    jobs, sent = population
    await write(settings.db_path, jobs)
    monkeypatch.setattr(columns, "BUILD_ROWS", 40)
    index = ColumnIndex(settings.db_path, tmp_path / "columns")
    build_all(index, settings.db_path)
    first = two_projects[0]
    db.execute("UPDATE projects SET retention_days = 1 WHERE id = ?", (first,))
    now = BASE + DAY_MS + 13 * HOUR_MS + 1234  # keeps the events from hour 13 on
    cut = (now - DAY_MS) // HOUR_MS * HOUR_MS
    assert prune(db, now, projects=[get_project(db, first)])[("site")] > 0
    kept = [s for s in sent if s.project == first and not s.bot and s.ts >= cut]
    assert any(s.ts < cut for s in sent if s.project == first and not s.bot)
    assert any(s.rows and s.first_ts < cut for s in index.view.segments[first])  # still in the columns

    everything = (0, BASE + 10 * DAY_MS)
    assert matched_ids(settings.db_path, index, first, *everything) == hexed(kept)
    assert matched_ids(settings.db_path, index, first, BASE, cut + 1) == hexed(s for s in kept if s.ts == cut)

    conn = connect(settings.db_path, readonly=True)
    index.build_once(conn)  # the next pass merges the rows out
    conn.close()
    assert all(s.rows == 0 or s.first_ts >= cut for s in index.view.segments[first])
    assert_columns_equal_table(index, settings.db_path, list(two_projects))
    assert matched_ids(settings.db_path, index, first, *everything) == hexed(kept)


async def test_a_new_project_with_a_deleted_ones_id_never_reads_its_segments(settings, db, two_projects,
                                                                               population, tmp_path):
    jobs, sent = population
    await write(settings.db_path, jobs)
    index = ColumnIndex(settings.db_path, tmp_path / "columns")
    build_all(index, settings.db_path)
    second = two_projects[1]
    assert index.view.segments[second]
    delete_project(db, get_project(db, second))
    # a database from before project ids were kept apart: the id is handed out again
    db.execute("DELETE FROM meta WHERE key = 'last_project_id'")
    while True:  # a project created in another millisecond, as any later one is
        again = create_project(db, "again")[0]
        if again.created_at != index.view.created[second]:
            break
        delete_project(db, again)
        db.execute("DELETE FROM meta WHERE key = 'last_project_id'")
    assert again.id == second
    new_jobs, new_sent = generate(second, 5, seed=21)
    await write(settings.db_path, new_jobs)
    expected = hexed(s for s in new_sent if not s.bot)
    window = (0, BASE + 10 * DAY_MS)

    found = matched_ids(settings.db_path, index, second, *window)  # the old segments still in the view
    assert found is None or found == expected
    build_all(index, settings.db_path)
    assert matched_ids(settings.db_path, index, second, *window) == expected
    old = hexed(s for s in sent if s.project == second)
    conn = connect(settings.db_path, readonly=True)
    assert not old & {u for (u,) in conn.execute("SELECT lower(hex(uuid)) FROM events")}
    conn.close()
    assert_columns_equal_table(index, settings.db_path, list(two_projects))


# -- matched against a recount -------------------------------------------------------------------------------------


FILTERS = [
    Filters(),
    Filters(event="click"), Filters(event="page_view"), Filters(event="$identify"), Filters(event="nothing"),
    Filters(path="/pricing"), Filters(path="/nowhere"),
    Filters(referrer="google.com"), Filters(referrer="news.ycombinator.com"),
    Filters(utm_source="ads"), Filters(utm_medium="email"), Filters(utm_campaign="launch"),
    Filters(utm_source="ads", utm_medium="cpc"), Filters(utm_source="nobody"),
    Filters(browser="Chrome"), Filters(browser="Mobile Safari"), Filters(os="Linux"), Filters(device="mobile"),
    Filters(device="desktop", browser="Firefox"), Filters(browser="Googlebot"),
    Filters(country="GB"), Filters(country="IN"), Filters(country="FR"),
    Filters(language="en"), Filters(language="de"),
    Filters(screen="mobile"), Filters(screen="desktop"),
    Filters(props=(("plan", "pro"),)), Filters(props=(("plan", ""),)), Filters(props=(("plan", "1"),)),
    Filters(props=(("n", "12345678901"),)), Filters(props=(("n", "-3"),)), Filters(props=(("ratio", "1.5"),)),
    Filters(props=(("ok", "1"),)), Filters(props=(("ok", "0"),)), Filters(props=(("maybe", "yes"),)),
    Filters(props=(("nested", '{"a":[1,"b"]}'),)), Filters(props=(("a.b", "dotted"),)),
    Filters(props=(('say "hi"', "quoted"),)), Filters(props=(("back\\slash", "bs"),)),
    Filters(props=(("größe", "groß"),)), Filters(props=(("ключ", "значение"),)), Filters(props=(("none", "x"),)),
    Filters(props=(("plan", "pro"), ("ok", "1"))),
    Filters(traits=(("gender", "Female"),)), Filters(traits=(("gender", "Male"), ("age", "30"))),
    Filters(traits=(("gender", "nobody"),)),
    Filters(event="click", traits=(("gender", "Other"),)),
    Filters(props=(("plan", "free"),), browser="Chrome", traits=(("age", "20"),)),
    Filters(path="/docs", referrer="google.com", utm_source="news", country="DE"),
    Filters(event="page_view", language="de", screen="laptop", os="iOS"),
]
WINDOWS = [(BASE, BASE + 40 * HOUR_MS), (BASE + 7 * HOUR_MS + 1_234_567, BASE + 22 * HOUR_MS + 99_999),
           (BASE + 3 * HOUR_MS + 1, BASE + 3 * HOUR_MS + 1_800_000)]


def expected_ids(sent: list[Sent], project: int, start: int, end: int, filters: Filters) -> set[str]:
    def fits(s: Sent) -> bool:
        checks = [(filters.event, s.name), (filters.path, s.path), (filters.referrer, s.referrer),
                  (filters.utm_source, s.utm[0]), (filters.utm_medium, s.utm[1]), (filters.utm_campaign, s.utm[2]),
                  (filters.browser, s.agent[0]), (filters.os, s.agent[1]), (filters.device, s.agent[2]),
                  (filters.country, s.country), (filters.language, s.language), (filters.screen, s.screen)]
        return (all(want is None or want == got for want, got in checks)
                and all(prop_text(s.props.get(key)) == value for key, value in filters.props)
                and all(prop_text(s.traits.get(key)) == value for key, value in filters.traits))
    return hexed(s for s in sent if s.project == project and not s.bot and start <= s.ts < end and fits(s))


@pytest.mark.parametrize("built", ["segments", "delta", "both"])
async def test_matched_equals_a_recount_under_every_filter(settings, two_projects, population, tmp_path, monkeypatch,
                                                           built):
    jobs, sent = population
    await write(settings.db_path, jobs)
    index = ColumnIndex(settings.db_path, tmp_path / "columns")
    if built == "segments":
        build_all(index, settings.db_path)
        assert index.view.through > 0
    elif built == "both":  # half built, the rest read from the table by the read itself
        monkeypatch.setattr(columns, "BUILD_ROWS", 150)
        conn = connect(settings.db_path, readonly=True)
        index._open()
        assert index.build_once(conn)
        conn.close()
    first = two_projects[0]
    times = sorted(s.ts for s in sent if s.project == first and not s.bot)
    windows = [*WINDOWS, (times[10], times[len(times) // 2])]  # from one event's time to another's (left out)
    checked = 0
    for filters in FILTERS:
        for start, end in windows:
            expected = expected_ids(sent, first, start, end, filters)
            assert matched_ids(settings.db_path, index, first, start, end, filters) == expected, (filters, start, end)
            checked += bool(expected)
    assert checked > len(FILTERS)  # most filters match something
