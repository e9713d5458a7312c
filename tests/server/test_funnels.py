"""Funnels against a recount, in plain Python, of a generated population.

Several dozen persons visit a small shop over three weeks in Asia/Kolkata (UTC+5:30, so its days and hours cut
through UTC's): sessions of page views, signups and purchases, steps that repeat, steps too late for the funnel's
window, anonymous visitors who identify halfway (one person from then on), crawlers that must count for nothing.
The events reach the server in shuffled batches, out of time order. The generator is shared with the retention
and paths tests.
"""

from __future__ import annotations

import random
import statistics
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from tests.servers import serving

TZ = "Asia/Kolkata"
SECOND, MINUTE, HOUR, DAY = 1000, 60_000, 3_600_000, 86_400_000
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
          " Safari/537.36")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BROWSERS = {FIREFOX: "Firefox", CHROME: "Chrome", GOOGLEBOT: "Googlebot"}
PAGES = ["/", "/pricing", "/signup", "/blog"]
DAYS = 21
# the first local midnight of the generated traffic: three weeks before today's, so nothing lies ahead of now
FIRST_DAY = datetime.now(ZoneInfo(TZ)).date() - timedelta(days=DAYS)


def local_ms(day: date, hours: float = 0) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(TZ)).timestamp() * 1000 + hours * HOUR)


@dataclass
class Sent:
    person: int  # who it is after identify
    name: str
    ts: int
    session: str
    agent: str
    path: str | None
    plan: str
    tier: str | None  # the person's trait, set by identify

    @property
    def bot(self) -> bool:
        return self.agent == GOOGLEBOT

    @property
    def browser(self) -> str:
        return BROWSERS[self.agent]

    @property
    def step(self) -> str:
        return f"page_view:{self.path}" if self.name == "page_view" else self.name


def generate(seed: int = 5, persons: int = 48) -> tuple[list[list[dict]], list[Sent]]:
    """(batches in the order they are sent, every event as the recount sees it)."""
    rng = random.Random(seed)
    used: set[int] = set()
    sent: list[Sent] = []
    first_round: list[dict] = []  # anonymous events and identifies
    second_round: list[dict] = []  # events under the identified id: sent after the identify
    for number in range(persons + 2):
        crawler = number >= persons
        agent = GOOGLEBOT if crawler else rng.choice([FIREFOX, CHROME])
        identifies = not crawler and rng.random() < 0.4
        tier = rng.choice(["gold", "silver"]) if identifies else None
        anonymous, known = f"anon-{number}", f"user-{number}"
        identified = False
        first_sent = len(sent)
        day = rng.randrange(DAYS - 6)
        for visit in range(rng.randint(1, 5)):
            day += rng.choice([0, 0, 1, 1, 2, 4])
            ts = local_ms(FIRST_DAY + timedelta(days=min(day, DAYS - 1)), rng.uniform(0, 23.5))
            session = f"s-{number}-{visit}"
            for _ in range(rng.randint(1, 7)):
                while ts in used:
                    ts += 1
                used.add(ts)
                kind = rng.random()
                if kind < 0.55:
                    name, path = "page_view", rng.choice(PAGES)
                else:
                    name, path = rng.choice(["signup", "signup", "purchase", "click"]), None
                plan = rng.choice(["free", "pro"])
                body = {"event": name, "uuid": str(uuid.uuid4()), "timestamp": ts, "session_id": session,
                        "user_agent": agent, "properties": {"plan": plan},
                        "distinct_id": known if identified else anonymous}
                if path is not None:
                    body["page_url"] = f"https://shop.example{path}"
                (second_round if identified else first_round).append(body)
                sent.append(Sent(number, name, ts, session, agent, path, plan, tier))
                if identifies and not identified and rng.random() < 0.3:
                    identified = True  # the next events come under the known id
                    ts += rng.randrange(SECOND, 5 * MINUTE)
                    used.add(ts)
                    first_round.append({"event": "$identify", "uuid": str(uuid.uuid4()), "timestamp": ts,
                                        "session_id": session, "user_agent": agent, "distinct_id": known,
                                        "anon_id": anonymous, "traits": {"tier": tier}})
                    sent.append(Sent(number, "$identify", ts, session, agent, None, "", tier))
                ts += rng.choice([rng.randrange(10 * SECOND, 20 * MINUTE), rng.randrange(HOUR, 5 * HOUR)])
        if not identified:  # never got to identify: no traits
            for item in sent[first_sent:]:
                item.tier = None
    batches = []
    for events in (first_round, second_round):
        rng.shuffle(events)
        batches += [events[i:i + 40] for i in range(0, len(events), 40)]
    return batches, sent


@pytest.fixture(scope="module")
def population():
    return generate()


@pytest.fixture
async def shop(store_backend, population):
    """The population sent to the store: SQLite, or the ClickHouse cluster (there once for the module: the
    tests only read)."""
    async def send(client, project) -> None:
        for batch in population[0]:
            response = await client.post("/api/v1/events/ingest", json={"events": batch},
                                         headers={"X-API-Key": project.ingest_key})
            assert response.status == 202, await response.text()

    client, project = await store_backend.loaded(send, name="shop", domain="shop.example", timezone=TZ)

    async def get(endpoint: str, status: int = 200, params=None, **named):
        response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=params or named,
                                    headers={"Authorization": f"Bearer {project.read_token}"})
        assert response.status == status, await response.text()
        return await response.json()

    return get


# -- the recount ------------------------------------------------------------------------------------------


def bound(text: str, end: bool = False) -> int:
    """A from/to value as the API reads it: a date is a whole day of the project's zone."""
    if "T" in text:
        return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(TZ)).timestamp() * 1000)
    return local_ms(date.fromisoformat(text) + timedelta(days=1 if end else 0))


def matches(item: Sent, filters: dict) -> bool:
    """Whether an event counts under the filters (bots never do)."""
    return not item.bot and all((
        filters.get("browser", item.browser) == item.browser,
        filters.get("prop.plan", item.plan) == item.plan,
        filters.get("trait.tier", item.tier) == item.tier,
        filters.get("path", item.path) == item.path,
    ))


def is_step(item: Sent, step: str) -> bool:
    name, _, path = step.partition(":")
    return item.name == name and (not path or item.path == path)


WINDOW_MS = {"1h": HOUR, "1d": DAY, "7d": 7 * DAY}


def best_chain(events: list, steps: list[str], window_ms: int, is_step) -> list:
    """One person's events (in time order) that reach furthest into the funnel: from each first-step event,
    every later event in order taking the next step when it is one, until the window after the first step is
    over; the first of equals."""
    best: list = []
    for i, first in enumerate(events):
        if not is_step(first, steps[0]):
            continue
        chain = [first]
        for later in events[i + 1:]:
            if len(chain) == len(steps) or later.ts > first.ts + window_ms:
                break
            if is_step(later, steps[len(chain)]):
                chain.append(later)
        if len(chain) > len(best):
            best = chain
    return best


def expected_funnel(sent: list[Sent], steps: list[str], window: str, start: int, end: int, filters: dict,
                    breakdown: str | None = None):
    """Per person: each first-step event, then every later event in time order taking the next step when it
    is one, until the window after the first step is over; the start that gets furthest (the first of
    equals) counts."""
    by_person: dict[int, list[Sent]] = {}
    for item in sorted(sent, key=lambda i: i.ts):
        if start <= item.ts < end and matches(item, filters):
            by_person.setdefault(item.person, []).append(item)
    groups: dict = {}
    for events in by_person.values():
        best = best_chain(events, steps, WINDOW_MS[window], is_step)
        if best:
            value = {None: None, "browser": best[0].browser, "prop.plan": best[0].plan,
                     "trait.tier": best[0].tier}[breakdown]
            group = groups.setdefault(value, [[] for _ in steps])
            for k, item in enumerate(best):
                group[k].append((item.ts - best[k - 1].ts) / 1000 if k else 0.0)
    return groups


def answer(steps: list[str], reached: list[list[float]] | None) -> list[dict]:
    reached = reached or [[] for _ in steps]
    first = len(reached[0])
    rows = []
    for k, step in enumerate(steps):
        persons, previous = len(reached[k]), len(reached[k - 1]) if k else first
        rows.append({"step": step, "persons": persons,
                     "conversion": round(persons / first, 4) if first else 0.0,
                     "from_previous": round(persons / previous, 4) if previous else 0.0,
                     "median_seconds": round(statistics.median(reached[k]), 1) if k and reached[k] else None})
    return rows


def overall(sent, steps, window, start, end, filters) -> list[dict]:
    groups = expected_funnel(sent, steps, window, start, end, filters)
    return answer(steps, groups.get(None))


FUNNELS = [
    ["page_view:/pricing", "signup", "purchase"],
    ["page_view", "signup"],
    ["signup", "purchase", "signup"],  # a step that repeats
    ["page_view:/", "page_view:/pricing", "page_view:/signup", "purchase"],
]
DAYS_WINDOW = (FIRST_DAY.isoformat(), (FIRST_DAY + timedelta(days=DAYS - 1)).isoformat())
HOURS_WINDOW = ((FIRST_DAY + timedelta(days=3)).isoformat() + "T07:20:00",
                (FIRST_DAY + timedelta(days=12)).isoformat() + "T19:45:10")
FILTERS = [{}, {"browser": "Firefox"}, {"prop.plan": "pro"}, {"trait.tier": "gold"}]


@pytest.mark.parametrize("steps", FUNNELS)
@pytest.mark.parametrize("window", ["1h", "1d", "7d"])
async def test_funnel_matches_a_recount(shop, population, steps, window):
    for start, end in (DAYS_WINDOW, HOURS_WINDOW):
        found = await shop("funnel", steps=",".join(steps), window=window, **{"from": start, "to": end})
        expected = overall(population[1], steps, window, bound(start), bound(end, True), {})
        assert found["steps"] == expected
        assert found["window"] == window and found["breakdown"] is None
    assert found["steps"][0]["persons"] > 0


@pytest.mark.parametrize("filters", FILTERS[1:])
async def test_funnel_under_filters(shop, population, filters):
    steps = FUNNELS[0]
    start, end = DAYS_WINDOW
    found = await shop("funnel", steps=",".join(steps), window="1d", **{"from": start, "to": end}, **filters)
    assert found["steps"] == overall(population[1], steps, "1d", bound(start), bound(end, True), filters)
    assert found["steps"][0]["persons"] > 0


@pytest.mark.parametrize("breakdown", ["browser", "prop.plan", "trait.tier"])
async def test_funnel_breakdown(shop, population, breakdown):
    steps = FUNNELS[1]
    start, end = DAYS_WINDOW
    found = await shop("funnel", steps=",".join(steps), window="1d", breakdown=breakdown,
                       **{"from": start, "to": end})
    groups = expected_funnel(population[1], steps, "1d", bound(start), bound(end, True), {}, breakdown)
    expected = [{"value": value, "steps": answer(steps, reached)} for value, reached in
                sorted(groups.items(), key=lambda item: (-len(item[1][0]), item[0] is None, item[0] or ""))]
    assert found["breakdown"] == expected
    assert len(expected) >= 2
    assert sum(group["steps"][0]["persons"] for group in found["breakdown"]) == found["steps"][0]["persons"]


async def test_a_person_who_identifies_between_steps_counts_once(store_backend):
    """An anonymous visitor views the pricing page, identifies, then signs up under the known id: one person
    who completes the funnel. Signing up first and viewing pricing after does not complete it, and a step past
    the window does not either. On both stores (on the ClickHouse cluster, each request to the next node)."""
    project = await store_backend.project("solo", timezone=TZ)
    client = await store_backend.client()
    now = datetime.now(ZoneInfo(TZ)).replace(microsecond=0)
    base = int(now.timestamp() * 1000) - 3 * HOUR
    events = [
        {"event": "page_view", "distinct_id": "anon-1", "page_url": "https://x.example/pricing", "timestamp": base},
        {"event": "$identify", "distinct_id": "ada", "anon_id": "anon-1", "timestamp": base + MINUTE},
        {"event": "signup", "distinct_id": "ada", "timestamp": base + 2 * MINUTE},
        {"event": "signup", "distinct_id": "bob", "timestamp": base},
        {"event": "page_view", "distinct_id": "bob", "page_url": "https://x.example/pricing", "timestamp": base + MINUTE},
        {"event": "page_view", "distinct_id": "cy", "page_url": "https://x.example/pricing", "timestamp": base},
        {"event": "signup", "distinct_id": "cy", "timestamp": base + HOUR + SECOND},
    ]
    for body in events:  # one request each, in this order: identify joins anon-1 to ada
        response = await client.post("/api/v1/events/ingest", json={"events": [body]},
                                     headers={"X-API-Key": project.ingest_key})
        assert response.status == 202
    response = await client.get(f"/api/v1/projects/{project.id}/funnel",
                                params={"steps": "page_view:/pricing,signup", "window": "1h", "range": "24h"},
                                headers={"Authorization": f"Bearer {project.read_token}"})
    found = await response.json()
    assert [(s["persons"], s["median_seconds"]) for s in found["steps"]] == [(3, None), (1, 120.0)]
    assert found["steps"][1]["conversion"] == found["steps"][1]["from_previous"] == round(1 / 3, 4)


BAD = [
    ({"steps": "signup"}, "steps"),
    ({"steps": ",".join(["a"] * 11)}, "steps"),
    ({"steps": "a,,b"}, "steps"),
    ({"steps": "a,b", "window": "2h"}, "window"),
    ({"steps": "a,b", "breakdown": "colour"}, "breakdown"),
    ({"steps": "a,b", "breakdown": "prop."}, "breakdown"),
    ({"steps": "a,b", "limit": "0"}, "limit"),
    ({"steps": "a,b", "nonsense": "1"}, "nonsense"),
    ({}, "steps"),
]


@pytest.mark.parametrize("params, field", BAD)
async def test_bad_parameters_are_400s_naming_them(shop, params, field):
    found = await shop("funnel", 400, range="7d", **params)
    assert found["field"] == field and found["error"].startswith(f"{field}: ")


async def test_a_repeated_parameter_is_a_400(shop):
    found = await shop("funnel", 400, params=[("range", "7d"), ("steps", "a,b"), ("window", "1h"), ("window", "1d")])
    assert found["field"] == "window"


async def test_pulse_serve_answers_funnels(tmp_path):
    """The real server process: another population, the same answer as the recount."""
    batches, sent = generate(seed=9, persons=16)
    steps = FUNNELS[1]
    start, end = DAYS_WINDOW
    async with serving(tmp_path / "data", "shop", "--timezone", TZ) as (server, project):
        async with aiohttp.ClientSession() as session:
            for batch in batches:
                async with session.post(f"{server.url}/api/v1/events/ingest", json={"events": batch},
                                        headers={"X-API-Key": project["ingest_key"]}) as response:
                    assert response.status == 202
            async with session.get(f"{server.url}/api/v1/projects/{project['id']}/funnel",
                                   params={"steps": ",".join(steps), "window": "1d", "from": start, "to": end},
                                   headers={"Authorization": f"Bearer {project['read_token']}"}) as response:
                assert response.status == 200
                found = await response.json()
    assert found["steps"] == overall(sent, steps, "1d", bound(start), bound(end, True), {})
    assert found["steps"][0]["persons"] > 0
