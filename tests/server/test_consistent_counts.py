"""Every count the filter picker shows is what the overview shows once that value is added as a filter.

For each source of filter values (top events, pages, browsers, OS, devices, referrers, UTM values, property
values, trait values), with and without a filter already applied, each row of the source is checked against
the overview under that filter plus the row's value, and both against a plain recount of the generated events.
Also: `pulse serve --demo` seeds enough history that the default views have a whole previous period.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import aiohttp
import pytest

from pulse.server.app import create_app
from tests.servers import Server

HOUR = 3_600_000
BASE = int(datetime(2026, 4, 6, tzinfo=timezone.utc).timestamp() * 1000)
AGENTS = {  # user agent -> (browser, os, device)
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36":
        ("Chrome", "Windows", "desktop"),
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 "
    "Mobile/15E148 Safari/604.1": ("Mobile Safari", "iOS", "mobile"),
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0": ("Firefox", "Linux", "desktop"),
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile "
    "Safari/537.36": ("Chrome Mobile", "Android", "mobile"),
}
BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
PAGES = ["/", "/pricing", "/docs", "/blog", "/signup"]
SOURCES = [  # (referrer, utm source, medium, campaign)
    (None, None, None, None), ("https://www.google.com/", None, None, None), ("https://news.example/", None, None, None),
    ("https://www.google.com/", "google", "cpc", "spring"), (None, "letter", "email", "april"),
]
# the window: cuts through hours at both ends, with sessions going on across its start
START, END = BASE + 20 * HOUR + 1_234_567, BASE + 60 * HOUR + 999
WINDOW = {"from": datetime.fromtimestamp(START / 1000, tz=timezone.utc).isoformat(),
          "to": datetime.fromtimestamp(END / 1000, tz=timezone.utc).isoformat()}


@dataclass
class Event:
    name: str
    ts: int
    person: int
    session: str
    agent: str
    path: str | None = None
    referrer: str | None = None  # the domain
    props: dict = field(default_factory=dict)


@dataclass
class Session:
    first: int
    referrer: str | None  # of its first page view, as are the UTM values
    utm: dict


def generate(seed: int = 11) -> tuple[list[tuple[str, list[dict]]], list[Event], dict[int, dict], dict[str, Session]]:
    """Requests (user agent, events), what each event is, the traits of each person who identifies, the sessions."""
    rng = random.Random(seed)
    requests, sent, traits, sessions = [], [], {}, {}
    for person in range(90):
        agent = rng.choice(list(AGENTS))
        identifies = rng.random() < 0.7
        identified = False
        for number in range(rng.randint(1, 4)):
            key = f"s{person}-{number}"
            ts = BASE + rng.randrange(72 * HOUR)
            referrer, *utm = rng.choice(SOURCES)
            domain = None if referrer is None else referrer.split("/")[2].removeprefix("www.")
            sessions[key] = Session(ts, domain, dict(zip(("utm_source", "utm_medium", "utm_campaign"), utm)))
            events = []
            for step in range(rng.randint(1, 7)):
                distinct = f"user-{person}" if identified else f"anon-{person}"
                body = {"distinct_id": distinct, "session_id": key, "timestamp": ts, "uuid": str(uuid.uuid4())}
                if step == 0 or rng.random() < 0.5:
                    path = rng.choice(PAGES)
                    query = "?" + "&".join(f"{k}={v}" for k, v in sessions[key].utm.items()) if step == 0 and utm[0] else ""
                    body.update(event="page_view", page_url=f"https://site.example{path}{query}")
                    item = Event("page_view", ts, person, key, agent, path=path)
                    if step == 0 and referrer:
                        body["referrer"] = referrer
                        item.referrer = domain
                else:
                    props = {"plan": rng.choice(["free", "pro", "team"]), "seats": rng.choice([1, 3])}
                    name = rng.choice(["click", "click", "signup"])
                    body.update(event=name, page_url=f"https://site.example{path}", properties=props)
                    item = Event(name, ts, person, key, agent, path=path, props=props)
                events.append(body)
                sent.append(item)
                if identifies and not identified:  # identify after the first event
                    identified = True
                    traits[person] = {"gender": rng.choice(["Male", "Female", "Other"]),
                                      "age_group": rng.choice(["<18", "18-40", ">40"])}
                    ts += 1000
                    events.append({"event": "$identify", "distinct_id": f"user-{person}", "anon_id": f"anon-{person}",
                                   "traits": traits[person], "session_id": key, "timestamp": ts,
                                   "uuid": str(uuid.uuid4())})
                    sent.append(Event("$identify", ts, person, key, agent))
                ts += rng.randrange(20_000, 900_000)
            requests.append((agent, events))
    requests.append((BOT, [{"event": "page_view", "distinct_id": "crawler", "session_id": "bot", "timestamp": BASE + i * HOUR,
                            "page_url": "https://site.example/pricing", "referrer": "https://www.google.com/",
                            "uuid": str(uuid.uuid4())} for i in range(72)]))
    return requests, sent, traits, sessions


@pytest.fixture(scope="module")
def population():
    return generate()


@pytest.fixture
async def api(aiohttp_client, settings, make_project, population):
    project = make_project("shop", domain="site.example")
    client = await aiohttp_client(create_app(settings))
    for agent, events in population[0]:
        response = await client.post("/api/v1/events/ingest", json={"events": events},
                                     headers={"X-API-Key": project.ingest_key, "User-Agent": agent})
        assert response.status == 202, await response.text()

    async def get(endpoint: str, params: dict) -> dict:
        response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params={**WINDOW, **params},
                                    headers={"Authorization": f"Bearer {project.read_token}"})
        assert response.status == 200, await response.text()
        return await response.json()

    return get


# -- the plain recount -------------------------------------------------------------------------------


def matching(population, filters: dict) -> list[Event]:
    """The events of the window that match the filters (an event's UTM values are its session's)."""
    _, sent, traits, sessions = population

    def value(item: Event, key: str):
        browser, os_name, device = AGENTS[item.agent]
        if key.startswith("trait."):
            return traits.get(item.person, {}).get(key[6:])
        if key.startswith("prop."):
            found = item.props.get(key[5:])
            return None if found is None else str(found)
        if key.startswith("utm_"):
            return sessions[item.session].utm[key]
        return {"event": item.name, "path": item.path, "referrer": item.referrer, "browser": browser,
                "os": os_name, "device": device}[key]

    return [e for e in sent if START <= e.ts < END and all(value(e, k) == v for k, v in filters.items())]


def started_sessions(population, filters: dict, column: str, value: str) -> set[str]:
    """What a session breakdown row counts: sessions that started in the window with that value, holding a
    matching event in the window (under filters)."""
    sessions = population[3]
    held = {e.session for e in matching(population, filters)}
    first = {}
    for e in population[1]:
        first[e.session] = min(first.get(e.session, e.ts), e.ts)
    return {key for key, s in sessions.items() if START <= first[key] < END and key in held
            and (s.referrer if column == "referrer" else s.utm[column]) == value}


# -- the cross-check ----------------------------------------------------------------------------------

SOURCES_OF_VALUES = [  # (endpoint, its parameters, the filter its values are for, what a row counts)
    ("top-events", {}, "event", "events"),
    ("pages", {}, "path", "page views"),
    ("browsers", {}, "browser", "events"),
    ("os", {}, "os", "events"),
    ("devices", {}, "device", "events"),
    ("properties/plan", {}, "prop.plan", "events"),
    ("properties/seats", {}, "prop.seats", "events"),
    ("traits/gender", {}, "trait.gender", "users"),
    ("traits/age_group", {}, "trait.age_group", "users"),
    ("referrers", {}, "referrer", "sessions"),
    ("utm", {"dimension": "source"}, "utm_source", "sessions"),
    ("utm", {"dimension": "medium"}, "utm_medium", "sessions"),
    ("utm", {"dimension": "campaign"}, "utm_campaign", "sessions"),
]
APPLIED = [{}, {"trait.gender": "Male"}, {"browser": "Chrome"}, {"utm_source": "google"}]


@pytest.mark.parametrize("applied", APPLIED, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "none")
@pytest.mark.parametrize("endpoint, params, key, counts", SOURCES_OF_VALUES,
                         ids=[f"{e}{'-' + p['dimension'] if p else ''}" for e, p, _, _ in SOURCES_OF_VALUES])
async def test_each_row_is_the_overview_under_its_value(api, population, endpoint, params, key, counts, applied):
    if key in applied:
        pytest.skip("the picker offers no second value for a filter already applied")
    rows = (await api(endpoint, {**params, **applied, "limit": "1000"}))["rows"]
    assert rows or applied, f"{endpoint} has no rows to check"
    for row in rows:
        chosen = {**applied, key: row["value"]}
        if counts == "page views":  # `path=` alone also counts the clicks on the path
            chosen["event"] = "page_view"
        overview = await api("overview", chosen)
        found = matching(population, chosen)
        assert (overview["events"], overview["unique_users"]) == (len(found), len({e.person for e in found}))
        if counts in ("events", "page views"):
            assert (row["count"], row["unique_users"]) == (overview["events"], overview["unique_users"]), (row, chosen)
        elif counts == "users":
            assert row["count"] == row["unique_users"] == overview["unique_users"], (row, chosen)
        else:
            started = started_sessions(population, applied, key, row["value"])
            assert row["count"] == len(started), (row, chosen)
            touched = {e.session for e in found}
            assert overview["sessions"] == len(touched)
            # the overview also counts the sessions under way when the window began, and nothing else
            first = {e.session: e.ts for e in sorted(population[1], key=lambda e: -e.ts)}
            assert started <= touched and all(first[s] < START for s in touched - started), (row, chosen)
    if counts == "users":  # every user with the trait is in some row
        assert sum(r["count"] for r in rows) == len({e.person for e in matching(population, applied)
                                                       if e.person in population[2]})


# -- the demo's history ---------------------------------------------------------------------------------

MIN_PREVIOUS_EVENTS = 20  # README: a change is shown against a previous period of at least this many events


async def test_demo_seeds_a_whole_previous_period_for_every_default_view(tmp_path):
    server = Server(tmp_path / "data", "--demo", log_path=tmp_path / "demo.log")
    await server.start()
    try:
        for _ in range(1200):
            if "demo traffic seeded: " in server.log_path.read_text():
                break
            await asyncio.sleep(0.1)
        text = server.log_path.read_text()
        assert re.search(r"demo traffic seeded: [\d,]+ events", text), text
        token = re.search(r"read token: (\S+)", text).group(1)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            async def read(endpoint: str, **params: str) -> dict:
                async with session.get(f"{server.url}/api/v1/projects/1/{endpoint}", params=params) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            for name in ("24h", "7d", "30d"):
                overview = await read("overview", range=name)
                previous = overview["previous"]
                assert previous["events"] >= MIN_PREVIOUS_EVENTS, (name, previous)
                assert overview["events"] / 3 < previous["events"] < overview["events"] * 3, (name, overview)
            days = (await read("timeseries", range="90d", interval="day"))["buckets"]
            with_events = [i for i, bucket in enumerate(days) if bucket["events"]]
            assert len(days) - with_events[0] >= 61, with_events[:3]  # the history goes back 61 days
            assert with_events == list(range(with_events[0], len(days)))  # every day since has traffic
    finally:
        server.stop(signal.SIGTERM)
