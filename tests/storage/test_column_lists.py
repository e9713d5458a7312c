"""The users, events and one-user lists and the goals, from the event columns, against a recount in plain
Python of the events posted: while every event is still read from the table beside the columns (the builder
has not reached them), when some are in a built segment and the rest are not, once every event is built (two
segments whose times overlap, so rows must be ordered across them), and with the columns off (`columns`
False: the rollups, day cache and raw scans).

Events tie on their time (within a user and across users), so the order newest first is broken by id as the
table's `ORDER BY ts DESC, id DESC`; pages are small so that cursors cut through the ties. A crawler sends
events under a user's distinct id: the user's timeline lists them, and no count has them.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from pulse.server.app import create_app
from pulse.server.keys import STORE
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.goals import add_goal
from pulse.storage.sqlite.projects import get_project

HOUR = 3_600_000
BASE = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1000)
AGENTS = {
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0": "Firefox",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
    " Safari/537.36": "Chrome",
}
BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
PAGES = ["/", "/pricing", "/thank-you", "/blog/a", "/blog/b"]
DECLARED = ["/thank-you", "/blog/*", "/nowhere", "signup", "newsletter"]
PAYMENTS = [{"revenue": 19.99, "currency": "eur"}, {"amount": 7.25, "currency": "usd"}, {"revenue": "12.5"},
            {"revenue": 5}, {}]
WINDOW = (BASE + 3 * HOUR + 1_234_567, BASE + 70 * HOUR + 99_999)  # cuts through hours at both ends
FILTERS = [{}, {"prop.plan": "pro"}, {"path": "/pricing"}, {"browser": "Firefox"}, {"utm_source": "news"},
           {"trait.gender": "Female"}, {"event": "purchase"},
           {"browser": "Chrome", "prop.plan": "pro", "trait.age_group": "18-40"}]
TIMELINES = ["user-2", "anon-2", "user-8", "anon-21", "crawled"]


@dataclass
class Sent:
    seq: int  # the order it was posted in: the table's ids follow it
    uuid: str
    name: str
    ts: int
    user: int
    session: str
    agent: str
    path: str | None = None
    utm_source: str | None = None
    props: dict = field(default_factory=dict)

    @property
    def bot(self) -> bool:
        return self.agent == BOT


Request = tuple[str, list[tuple[dict, Sent]]]  # a user agent, and each event's body with what it is


def generate(seed: int = 3) -> tuple[list[list[Request]], list[Sent], dict[int, dict]]:
    """Two halves of requests whose times overlap (each event numbered in the order it is posted: half after
    half), every event sent, and the traits of the users that identify themselves (every other user stays
    anonymous)."""
    rng = random.Random(seed)
    halves: list[list[Request]] = [[], []]
    traits: dict[int, dict] = {}

    def made(body: dict, **item) -> tuple[dict, Sent]:
        body["uuid"] = str(uuid.UUID(int=rng.getrandbits(128)))
        body["timestamp"] = item["ts"]
        return body, Sent(0, body["uuid"], **item)

    for user in range(30):
        agent = rng.choice(list(AGENTS))
        if user % 2 == 0:
            traits[user] = {"gender": rng.choice(["Female", "Male"]), "age_group": rng.choice(["18-40", ">40"])}
        identified = False
        for number in range(rng.randint(1, 3)):
            session, source = f"s{user}-{number}", rng.choice([None, "news", "ads"])
            ts = BASE + rng.randrange(3 * 24 * HOUR) // 60_000 * 60_000  # whole minutes: times tie
            events = []
            for step in range(rng.randint(1, 7)):
                body: dict = {"distinct_id": f"user-{user}" if identified else f"anon-{user}", "session_id": session}
                if step == 0 or rng.random() < 0.4:
                    path = rng.choice(PAGES)
                    props = {"plan": rng.choice(["free", "pro"])}
                    if path == "/thank-you":
                        props.update(revenue=10, currency="eur")
                    query = f"?utm_source={source}" if step == 0 and source else ""
                    body.update(event="page_view", page_url=f"https://site.example{path}{query}", properties=props)
                    events.append(made(body, name="page_view", ts=ts, user=user, session=session, agent=agent,
                                       path=path, utm_source=source if step == 0 else None, props=props))
                else:
                    name = rng.choice(["click", "signup", "purchase", "purchase"])
                    paid = rng.choice(PAYMENTS) if name == "purchase" else {}
                    props = {"plan": rng.choice(["free", "pro"]), **paid}
                    body.update(event=name, properties=props)
                    events.append(made(body, name=name, ts=ts, user=user, session=session, agent=agent, props=props))
                if user in traits and not identified:
                    identified = True
                    events.append(made({"event": "$identify", "distinct_id": f"user-{user}", "anon_id": f"anon-{user}",
                                        "traits": traits[user], "session_id": session},
                                       name="$identify", ts=ts, user=user, session=session, agent=agent))
                ts += rng.choice([0, 0, 60_000, 7 * 60_000, HOUR])
            halves[number % 2].append((agent, events))
    crawled = []  # a crawler under user 2's ids, and one under an id of its own
    for i, distinct in enumerate(["user-2", "anon-2", "user-2", "crawled", "crawled"]):
        crawled.append(made({"event": "page_view", "distinct_id": distinct, "session_id": "bot",
                             "page_url": "https://site.example/pricing", "properties": {"plan": "pro"}},
                            name="page_view", ts=BASE + 5 * HOUR + i * 20 * 60_000, user=2 if i < 3 else 99,
                            session="bot", agent=BOT, path="/pricing", props={"plan": "pro"}))
    halves[1].append((BOT, crawled))
    sent = [item for half in halves for _, events in half for _, item in events]
    for seq, item in enumerate(sent):
        item.seq = seq
    return halves, sent, traits


# -- the recount ---------------------------------------------------------------------------------------------------


def matching(sent: list[Sent], traits: dict[int, dict], filters: dict) -> list[Sent]:
    """The events of WINDOW that match the filters, crawlers' left out; a UTM source is the session's (that of
    its first page view)."""
    sources = {item.session: item.utm_source for item in sorted(sent, key=lambda item: (item.ts, item.seq))[::-1]
               if item.name == "page_view"}
    found = []
    for item in sent:
        if item.bot or not WINDOW[0] <= item.ts < WINDOW[1]:
            continue
        fields = {"event": item.name, "path": item.path, "browser": AGENTS[item.agent],
                  "utm_source": sources.get(item.session), "prop.plan": item.props.get("plan"),
                  **{f"trait.{k}": v for k, v in traits.get(item.user, {}).items()}}
        if all(fields.get(key) == value for key, value in filters.items()):
            found.append(item)
    return found


def newest_first(items: list[Sent]) -> list[str]:
    return [item.uuid for item in sorted(items, key=lambda item: (item.ts, item.seq), reverse=True)]


def expected_users(sent: list[Sent], traits: dict[int, dict], filters: dict) -> list[dict]:
    counted: dict[int, int] = defaultdict(int)
    for item in matching(sent, traits, filters):
        counted[item.user] += 1
    rows = []
    for user, count in counted.items():
        if user in traits:  # identified
            mine = [item.ts for item in sent if item.user == user]
            rows.append({"distinct_id": f"user-{user}", "traits": traits[user], "first_seen": min(mine),
                         "last_seen": max(mine), "window_events": count, "lifetime_events": len(mine)})
    return sorted(rows, key=lambda row: row["last_seen"], reverse=True)


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def revenue(items: list[Sent]) -> list[dict]:
    sums: dict = defaultdict(Decimal)
    for item in items:
        value = item.props.get("revenue")
        value = value if number(value) else item.props.get("amount")
        if number(value):
            currency = item.props.get("currency")
            sums[currency.upper() if isinstance(currency, str) else None] += Decimal(str(value))
    return [{"currency": currency, "amount": float(amount)}
            for currency, amount in sorted(sums.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]


def expected_goals(sent: list[Sent], traits: dict[int, dict], filters: dict) -> dict:
    found = matching(sent, traits, filters)
    visitors = len({item.user for item in found})
    goals: dict[str, tuple[str, list[Sent]]] = {}
    for item in found:
        if item.name != "page_view" and not item.name.startswith("$"):
            goals.setdefault(item.name, ("event", []))[1].append(item)
    for goal in DECLARED:
        if goal.startswith("/"):
            hit = [i for i in found if i.name == "page_view" and i.path is not None
                   and (i.path.startswith(goal[:-1]) if goal.endswith("*") else i.path == goal)]
            goals[goal] = ("page", hit)
        else:
            goals.setdefault(goal, ("event", []))
    rows = []
    for goal, (kind, items) in goals.items():
        users = len({item.user for item in items})
        rows.append({"goal": goal, "kind": kind, "visitors": users, "events": len(items),
                     "conversion_rate": round(users / visitors, 4) if visitors else 0.0, "revenue": revenue(items)})
    rows.sort(key=lambda row: (-row["visitors"], row["goal"]))
    return {"visitors": visitors, "rows": rows}


def expected_timeline(sent: list[Sent], distinct_id: str) -> tuple[int, list[str]]:
    """(the user's events in WINDOW but a crawler's, every one of them newest first)."""
    user = 99 if distinct_id == "crawled" else int(distinct_id.split("-")[1])
    mine = [item for item in sent if item.user == user and WINDOW[0] <= item.ts < WINDOW[1]]
    return sum(not item.bot for item in mine), newest_first(mine)


# -- the server ----------------------------------------------------------------------------------------------------


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


async def start(aiohttp_client, settings, make_project, db):
    project = make_project("shop", domain="site.example")
    for goal in DECLARED:
        add_goal(db, get_project(db, project.id), goal)
    app = create_app(settings)
    client = await aiohttp_client(app)

    async def post(half: list[Request]) -> None:
        for agent, events in half:
            response = await client.post("/api/v1/events/ingest", json={"events": [body for body, _ in events]},
                                         headers={"X-API-Key": project.ingest_key, "User-Agent": agent})
            assert response.status == 202, await response.text()

    async def get(endpoint: str, **params) -> dict:
        response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}",
                                    params={"from": iso(WINDOW[0]), "to": iso(WINDOW[1]), **params},
                                    headers={"Authorization": f"Bearer {project.read_token}"})
        assert response.status == 200, await response.text()
        return await response.json()

    return app[STORE], post, get


async def all_pages(get, endpoint: str, limit: int, **params) -> tuple[list[dict], dict]:
    rows, cursor, first = [], None, None
    while True:
        body = await get(endpoint, limit=str(limit), **params, **({"cursor": cursor} if cursor else {}))
        first = first or body
        assert len(body["rows"]) <= limit
        rows += body["rows"]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, first


async def check(get, sent: list[Sent], traits: dict[int, dict]) -> None:
    """Every list and the goals, under every filter, against the recount of `sent`."""
    for filters in FILTERS:
        users, _ = await all_pages(get, "users", 4, **filters)
        assert users == expected_users(sent, traits, filters), filters
        events, _ = await all_pages(get, "events", 7, **filters)
        assert [row["uuid"] for row in events] == newest_first(matching(sent, traits, filters)), filters
        by_uuid = {item.uuid: item for item in sent}
        assert all((row["event"], row["ts"], row["path"], row["properties"], row["browser"])
                   == (by_uuid[row["uuid"]].name, by_uuid[row["uuid"]].ts, by_uuid[row["uuid"]].path,
                       by_uuid[row["uuid"]].props or None, AGENTS[by_uuid[row["uuid"]].agent]) for row in events)
        goals = await get("goals", **filters)
        expected = expected_goals(sent, traits, filters)
        assert (goals["visitors"], goals["rows"]) == (expected["visitors"], expected["rows"]), filters
    for distinct_id in TIMELINES:
        if distinct_id == "crawled" and not any(item.user == 99 for item in sent):
            continue  # its crawler has not come yet
        rows, first = await all_pages(get, f"users/{distinct_id}", 3)
        count, newest = expected_timeline(sent, distinct_id)
        assert (first["user"]["window_events"], [row["uuid"] for row in rows]) == (count, newest), distinct_id


def build(store, settings) -> None:
    """What the server's column builder does on its next passes, until it has every event."""
    conn = connect(settings.db_path, readonly=True)
    try:
        while store.columns.build_once(conn):
            pass
    finally:
        conn.close()


def highest(settings) -> int:
    conn = connect(settings.db_path, readonly=True)
    try:
        return conn.execute("SELECT max(id) FROM events").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def population():
    return generate()


async def test_lists_and_goals_from_the_columns_match_a_recount(aiohttp_client, settings, make_project, db,
                                                                population):
    halves, sent, traits = population
    store, post, get = await start(aiohttp_client, settings, make_project, db)
    store.columns.stop()  # the builder stays where it is until build() is called
    first = [item for _, events in halves[0] for _, item in events]
    await post(halves[0])
    assert store.columns.view.through == 0
    await check(get, first, traits)  # every event read from the table beside the (empty) columns
    build(store, settings)
    built = store.columns.view.through
    assert built == highest(settings)
    await post(halves[1])
    assert store.columns.view.through == built < highest(settings)
    await check(get, sent, traits)  # a built segment, and the second half read from the table
    build(store, settings)
    assert store.columns.view.through == highest(settings)
    assert len(store.columns.view.segments[1]) == 2  # their times overlap
    await check(get, sent, traits)


async def test_lists_and_goals_without_columns_match_the_same_recount(aiohttp_client, settings, make_project, db,
                                                                      population):
    halves, sent, traits = population
    store, post, get = await start(aiohttp_client, dataclasses.replace(settings, columns=False), make_project, db)
    assert store.columns is None
    await post(halves[0])
    await post(halves[1])
    await check(get, sent, traits)
