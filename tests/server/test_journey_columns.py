"""Funnels and paths from the event columns against a recount in plain Python, in the three states a read can
find the columns in: nothing built yet (every event read from the table by the read itself), built by the
server's builder, and switched off (`columns=False`: the SQL over the events table).

The population: visitors of a shop in Asia/Kolkata (its days cut through UTC's hours) with sessions from UTM
sources, steps that repeat, steps too late for a funnel's window, anonymous visitors who identify between two
steps, and events of one person in the same millisecond (ordered by their arrival, as their ids are); crawlers
that count for nothing. Batches arrive shuffled, out of time order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import apsw
import msgspec
import pytest

from pulse.server.app import create_app
from pulse.server.keys import STORE
from pulse.storage.model import Filters, Window
from pulse.storage.sqlite import funnels, paths
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.day_cache import DayCache, Snapshot
from pulse.storage.sqlite.projects import create_project
from pulse.storage.sqlite.schema import migrate
from tests.server.test_funnels import (
    BROWSERS,
    CHROME,
    DAYS,
    FIREFOX,
    FIRST_DAY,
    GOOGLEBOT,
    HOUR,
    MINUTE,
    SECOND,
    TZ,
    WINDOW_MS,
    answer,
    best_chain,
    bound,
    local_ms,
)
from tests.server.test_paths import tree

PAGES = ["/", "/pricing", "/signup"]
SOURCES = ["google", "news", None]
BUILT_WAIT_S = 60  # the builder builds every second; this only keeps a broken one from hanging the test


@dataclass
class Sent:
    person: int  # who it is after identify
    name: str
    ts: int
    session: str
    agent: str
    path: str | None
    plan: str | None
    tier: str | None  # the person's trait, set by identify
    source: str | None = None  # the session's UTM source (its first page view's)
    seq: int = 0  # its place in the order of arrival: events of one millisecond are in this order

    @property
    def bot(self) -> bool:
        return self.agent == GOOGLEBOT

    @property
    def step(self) -> str:
        return f"page_view:{self.path}" if self.name == "page_view" else self.name


def generate(seed: int = 11, persons: int = 40) -> tuple[list[list[dict]], list[Sent]]:
    """(batches in the order they are sent, every event as the recount sees it)."""
    rng = random.Random(seed)
    sent: list[Sent] = []
    bodies: list[tuple[int, dict, Sent]] = []  # (round, body, what it is): known ids only after the identify
    for number in range(persons + 2):
        crawler = number >= persons
        agent = GOOGLEBOT if crawler else rng.choice([FIREFOX, CHROME])
        identifies = not crawler and rng.random() < 0.5
        tier = rng.choice(["gold", "silver"]) if identifies else None
        anonymous, known = f"anon-{number}", f"user-{number}"
        identified = False
        first_sent = len(sent)
        day = rng.randrange(DAYS - 6)
        for visit in range(rng.randint(1, 4)):
            day += rng.choice([0, 1, 2])
            ts = local_ms(FIRST_DAY + timedelta(days=min(day, DAYS - 1)), rng.uniform(0, 23.5))
            session = f"s-{number}-{visit}"
            source = rng.choice(SOURCES)
            for position in range(rng.randint(2, 8)):
                if position == 0 or rng.random() < 0.45:  # a session opens with a page view
                    name, path = "page_view", rng.choice(PAGES)
                else:
                    name, path = rng.choice(["signup", "signup", "purchase", "click"]), None
                plan = rng.choice(["free", "pro"])
                body = {"event": name, "uuid": str(uuid.uuid4()), "timestamp": ts, "session_id": session,
                        "user_agent": agent, "properties": {"plan": plan},
                        "distinct_id": known if identified else anonymous}
                if path is not None:
                    query = f"?utm_source={source}" if position == 0 and source else ""
                    body["page_url"] = f"https://shop.example{path}{query}"
                item = Sent(number, name, ts, session, agent, path, plan, tier, source)
                sent.append(item)
                bodies.append((1 if identified else 0, body, item))
                if identifies and not identified and position > 0 and rng.random() < 0.35:
                    identified = True  # the next events come under the known id
                    ts += rng.randrange(SECOND, 2 * MINUTE)
                    item = Sent(number, "$identify", ts, session, agent, None, None, tier, source)
                    sent.append(item)
                    bodies.append((0, {"event": "$identify", "uuid": str(uuid.uuid4()), "timestamp": ts,
                                       "session_id": session, "user_agent": agent, "distinct_id": known,
                                       "anon_id": anonymous, "traits": {"tier": tier}}, item))
                # the next event: in the same millisecond now and then (not as the first page view, whose UTM
                # source is the session's), else seconds, minutes or hours later
                ts += rng.choice([0 if position else SECOND, rng.randrange(10 * SECOND, 20 * MINUTE),
                                  rng.randrange(10 * SECOND, 20 * MINUTE), rng.randrange(HOUR, 5 * HOUR)])
        if not identified:
            for item in sent[first_sent:]:
                item.tier = None
    order: list[tuple[dict, Sent]] = []
    for round_ in (0, 1):
        events = [(body, item) for r, body, item in bodies if r == round_]
        rng.shuffle(events)
        order += events
    for seq, (_, item) in enumerate(order):
        item.seq = seq
    return [[body for body, _ in order[i:i + 30]] for i in range(0, len(order), 30)], sent


# -- the recount ------------------------------------------------------------------------------------------------

def matches(item: Sent, filters: dict) -> bool:
    """Whether an event counts under the filters (crawlers never do)."""
    return not item.bot and all((
        filters.get("browser", BROWSERS[item.agent]) == BROWSERS[item.agent],
        filters.get("prop.plan", item.plan) == item.plan,
        filters.get("trait.tier", item.tier) == item.tier,
        filters.get("path", item.path) == item.path,
        filters.get("utm_source", item.source) == item.source,
        filters.get("event", item.name) == item.name,
    ))


def is_step(item: Sent, step: str) -> bool:
    name, _, path = step.partition(":")
    return item.name == name and (not path or item.path == path)


def in_order(sent: list[Sent], start: int, end: int, filters: dict) -> list[Sent]:
    return [item for item in sorted(sent, key=lambda i: (i.ts, i.seq))
            if start <= item.ts < end and matches(item, filters)]


VALUE = {"browser": lambda item: BROWSERS[item.agent], "prop.plan": lambda item: item.plan,
         "trait.tier": lambda item: item.tier, "utm_source": lambda item: item.source}


def expected_funnel(sent: list[Sent], steps: list[str], window: str, start: int, end: int, filters: dict,
                    breakdown: str | None) -> tuple[list[dict], list[dict] | None]:
    """Per person, from each first-step event, every later event in order taking the next step when it is one,
    until the window after the first step is over; the start that gets furthest (the first of equals) counts,
    and its first step's value for the breakdown."""
    by_person: dict[int, list[Sent]] = {}
    for item in in_order(sent, start, end, filters):
        by_person.setdefault(item.person, []).append(item)
    overall = [[] for _ in steps]
    groups: dict = {}
    for events in by_person.values():
        best = best_chain(events, steps, WINDOW_MS[window], is_step)
        if best:
            group = groups.setdefault(VALUE[breakdown](best[0]) if breakdown else None, [[] for _ in steps])
            for k, item in enumerate(best):
                seconds = (item.ts - best[k - 1].ts) / 1000 if k else 0.0
                overall[k].append(seconds)
                group[k].append(seconds)
    if breakdown is None:
        return answer(steps, overall), None
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1][0]), item[0] is None, item[0] or ""))
    return answer(steps, overall), [{"value": value, "steps": answer(steps, reached)} for value, reached in ranked]


def expected_paths(sent: list[Sent], asked: str, step: str, start: int, end: int, filters: dict, depth: int,
                   limit: int) -> dict:
    """Per session with the starting step: its steps in order from the first one, a repeat right after itself
    once; as a tree."""
    sessions: dict[str, list[Sent]] = {}
    for item in in_order(sent, start, end, filters):
        sessions.setdefault(item.session, []).append(item)
    walked = []
    for events in sessions.values():
        firsts = [i for i, item in enumerate(events) if is_step(item, step)]
        if firsts:
            steps = [events[firsts[0]].step]
            for item in events[firsts[0] + 1:]:
                if item.step != steps[-1]:
                    steps.append(item.step)
            walked.append(steps)
    return tree(step if asked.startswith("/") else asked, walked, 0, depth, limit)


# -- the questions --------------------------------------------------------------------------------------------

WINDOWS = [(FIRST_DAY.isoformat(), (FIRST_DAY + timedelta(days=DAYS - 1)).isoformat()),
           ((FIRST_DAY + timedelta(days=2)).isoformat() + "T07:20:00",
            (FIRST_DAY + timedelta(days=11)).isoformat() + "T19:45:10")]
FUNNELS = [
    (["page_view:/pricing", "signup", "purchase"], "1d"),
    (["signup", "purchase", "signup"], "1h"),  # a step that repeats; steps past the window
    (["page_view", "signup"], "7d"),
    (["page_view:/", "page_view", "page_view:/signup"], "1h"),  # a page view that is two steps
]
FILTERS = [{}, {"browser": "Firefox"}, {"prop.plan": "pro"}, {"trait.tier": "gold"}, {"utm_source": "google"},
           {"path": "/pricing"}, {"event": "signup"},
           {"browser": "Chrome", "prop.plan": "free", "trait.tier": "silver"},
           {"utm_source": "nowhere"}, {"prop.plan": "none"}]  # the last two match nothing
BREAKDOWNS = [None, "browser", "prop.plan", "trait.tier", "utm_source"]
PATHS = [("/", "page_view:/", 3, 3), ("signup", "signup", 4, 2), ("page_view", "page_view", 2, 5)]


async def send(client, project, batches: list[list[dict]]) -> None:
    for batch in batches:
        response = await client.post("/api/v1/events/ingest", json={"events": batch},
                                     headers={"X-API-Key": project.ingest_key})
        assert response.status == 202, await response.text()


async def get(client, project, endpoint: str, **params) -> dict:
    response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=params,
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 200, await response.text()
    return await response.json()


async def check(client, project, sent: list[Sent]) -> None:
    reached = 0
    for start, end in WINDOWS:
        window = {"from": start, "to": end}
        for filters in FILTERS:
            for steps, span in FUNNELS:
                for breakdown in BREAKDOWNS if not filters else [None, "browser"]:
                    extra = {"breakdown": breakdown} if breakdown else {}
                    found = await get(client, project, "funnel", steps=",".join(steps), window=span, **window,
                                      **filters, **extra)
                    expected, groups = expected_funnel(sent, steps, span, bound(start), bound(end, True), filters,
                                                       breakdown)
                    assert found["steps"] == expected, (steps, span, filters, breakdown)
                    assert found["breakdown"] == groups, (steps, span, filters, breakdown)
                    reached += expected[-1]["persons"]
            for asked, step, depth, limit in PATHS:
                found = await get(client, project, "paths", start=asked, depth=str(depth), limit=str(limit),
                                  **window, **filters)
                assert found["root"] == expected_paths(sent, asked, step, bound(start), bound(end, True), filters,
                                                       depth, limit), (asked, filters)
    assert reached > 0


@pytest.fixture(scope="module")
def population():
    batches, sent = generate()
    # what the population must hold for the checks to mean something
    assert any(a.ts == b.ts and a.person == b.person and not a.bot for a, b in itertools.pairwise(sent))
    assert {item.source for item in sent} >= {"google", "news", None}
    assert any(item.name == "$identify" for item in sent)
    return batches, sent


class Keys(NamedTuple):
    id: int
    ingest_key: str
    read_token: str


def keys(settings) -> Keys:
    """The shop's project, made in the database before the server starts."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(settings.db_path)
    try:
        migrate(conn)
        project, ingest_key, read_token = create_project(conn, "shop", domain="shop.example", timezone=TZ)
    finally:
        conn.close()
    return Keys(project.id, ingest_key, read_token)


async def test_before_the_builder_reaches_the_events(aiohttp_client, settings, population):
    """Nothing built: every answer is made from the events the read builds from the table itself, and a funnel's
    step events of whole days are kept for the next one."""
    settings = dataclasses.replace(settings, warm_days=0)  # nothing else fills the day cache meanwhile
    project = keys(settings)
    app = create_app(settings)
    client = await aiohttp_client(app)
    index = app[STORE].columns
    assert index is not None
    await asyncio.to_thread(index.stop)  # the builder stops before any event is written: none is ever built
    await send(client, project, population[0])
    # a funnel keeps its step events of whole days in the readers' day cache; asked again, it adds nothing
    days = app[STORE].reader.days
    held = days.bytes
    steps, span = FUNNELS[0]
    start, end = WINDOWS[0]
    asked = {"steps": ",".join(steps), "window": span, "from": start, "to": end}
    first = await get(client, project, "funnel", **asked)
    assert days.bytes > held
    held = days.bytes
    assert await get(client, project, "funnel", **asked) == first
    assert days.bytes == held
    await check(client, project, population[1])
    assert index.view.through == 0


async def test_after_the_builder_caught_up(aiohttp_client, settings, population):
    """Every event built into segments: the answers, and the same answers read with the events table's rows
    unreadable but for their ids (so from the columns alone)."""
    project = keys(settings)
    app = create_app(settings)
    client = await aiohttp_client(app)
    batches, sent = population
    await send(client, project, batches)
    index = app[STORE].columns
    reader = connect(settings.db_path, readonly=True)
    highest = reader.execute("SELECT max(id) FROM events").fetchone()[0]
    for _ in range(BUILT_WAIT_S * 10):
        if index.view.through >= highest:
            break
        index.poke()
        await asyncio.sleep(0.1)
    assert index.view.through >= highest
    await check(client, project, sent)

    def deny_rows(op, table, column, *_):
        if op == apsw.SQLITE_READ and table == "events" and column not in ("", "id", "project_id"):
            return apsw.SQLITE_DENY
        return apsw.SQLITE_OK

    reader.authorizer = deny_rows
    start, end = WINDOWS[1]
    window = Window(bound(start), bound(end, True))
    for filters, params in ((Filters(), {}), (Filters(browser="Firefox", props=(("plan", "pro"),)),
                                              {"browser": "Firefox", "prop.plan": "pro"})):
        steps, span = FUNNELS[0]
        reader.execute("BEGIN")
        try:
            found = funnels.funnel(Snapshot(reader, DayCache(), index), project.id, window, filters,
                                   [(s.partition(":")[0], s.partition(":")[2] or None) for s in steps], steps,
                                   WINDOW_MS[span], "browser", 10)
            tree_found = paths.paths(Snapshot(reader, DayCache(), index), project.id, window, filters,
                                     ("page_view", "/"), "page_view:/", 3, 3)
        finally:
            reader.execute("COMMIT")
        answered = await get(client, project, "funnel", steps=",".join(steps), window=span, breakdown="browser",
                             **{"from": start, "to": end}, **params)
        assert msgspec.to_builtins(found[0]) == answered["steps"]
        assert msgspec.to_builtins(found[1]) == answered["breakdown"]
        walked = await get(client, project, "paths", start="/", depth="3", limit="3", **{"from": start, "to": end},
                           **params)
        assert msgspec.to_builtins(tree_found) == walked["root"]
    reader.close()


async def test_with_the_columns_off(aiohttp_client, settings, population):
    """`columns=False`: no index, the SQL over the events table answers alike."""
    settings = dataclasses.replace(settings, columns=False)
    project = keys(settings)
    app = create_app(settings)
    client = await aiohttp_client(app)
    assert app[STORE].columns is None
    await send(client, project, population[0])
    await check(client, project, population[1])
