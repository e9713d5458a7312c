"""Goals and the bots report against a recount, in plain Python, of a generated population.

The project is in America/Sao_Paulo (UTC-3), so its days cut through UTC days. Purchases carry revenue or
amount in two currencies, without one, and as text (which is not a number, so not revenue); crawlers
(Googlebot and bingbot, by the request's agent and by a forwarded one, and through the Plausible and Umami
drop-ins) send page views and purchases that every number must leave out and the bots report must show.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from pulse.enrich import parse_agent
from pulse.server.app import create_app
from pulse.storage.sqlite.goals import add_goal
from pulse.storage.sqlite.projects import get_project

TZ = "America/Sao_Paulo"
HOUR = 3_600_000
BASE = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1000)
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
          " Safari/537.36")
BROWSERS = {FIREFOX: "Firefox", CHROME: "Chrome"}
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
PAGES = ["/", "/pricing", "/thank-you", "/blog/a", "/blog/b", "/blogroll"]
DECLARED = ["/thank-you", "/blog/*", "/nowhere", "signup", "newsletter"]
PAYMENTS = [  # properties of a purchase, besides its plan
    {"revenue": 19.99, "currency": "eur"},
    {"revenue": 5, "currency": "EUR"},
    {"amount": 7.25, "currency": "usd"},
    {"revenue": 3.1},  # no currency
    {"revenue": "12.5", "currency": "EUR"},  # text: not revenue
    {"revenue": "12.5", "amount": 2.2, "currency": "USD"},  # text revenue, a numeric amount
    {"revenue": 0.1, "currency": 978},  # a currency that is not text: none
    {},
]


@dataclass
class Sent:
    name: str
    ts: int
    user: str
    agent: str
    path: str | None = None
    props: dict = field(default_factory=dict)


def generate(seed: int = 11) -> tuple[list[tuple[str, list[dict]]], list[Sent]]:
    """(user agent, events) per request, and what each event is; crawlers' events included."""
    rng = random.Random(seed)
    requests, sent = [], []
    for number in range(40):
        user, agent = f"u{number}", rng.choice(list(BROWSERS))
        events = []
        ts = BASE + rng.randrange(3 * 24 * HOUR)
        for _ in range(rng.randint(1, 8)):
            plan = rng.choice(["free", "pro"])
            kind = rng.random()
            if kind < 0.55:
                path = rng.choice(PAGES)
                props = {"plan": plan}
                if path == "/thank-you" and rng.random() < 0.5:
                    props.update(revenue=10, currency="eur")  # a page view's revenue counts for its path goal
                item = Sent("page_view", ts, user, agent, path=path, props=props)
                body = {"event": "page_view", "page_url": f"https://site.example{path}", "properties": props}
            else:
                name = rng.choice(["signup", "purchase", "purchase", "click", "$identify"])
                props = {"plan": plan, **(rng.choice(PAYMENTS) if name == "purchase" else {})}
                if name == "$identify":
                    props = {}
                item = Sent(name, ts, user, agent, props=props)
                body = {"event": name, **({"properties": props} if props else {})}
            body.update(distinct_id=user, uuid=str(uuid.uuid4()), timestamp=ts)
            events.append(body)
            sent.append(item)
            ts += rng.randrange(10_000, 3 * HOUR)
        requests.append((agent, events))
    for number, agent in enumerate((GOOGLEBOT, BINGBOT)):
        events = []
        for i in range(12 + number * 5):
            ts = BASE + i * 5 * HOUR + 61_000 * i
            name, path = ("purchase", None) if i % 3 == 0 else ("page_view", rng.choice(PAGES))
            body = {"event": name, "distinct_id": f"crawler-{number}-{i % 4}", "uuid": str(uuid.uuid4()),
                    "timestamp": ts, "properties": {"plan": "pro", "revenue": 100, "currency": "EUR"}}
            if path:
                body["page_url"] = f"https://site.example{path}"
            if agent == BINGBOT:
                body["user_agent"] = agent  # forwarded by a backend
            events.append(body)
            sent.append(Sent(name, ts, body["distinct_id"], agent, path=path, props=body["properties"]))
        requests.append((CHROME if agent == BINGBOT else agent, events))
    return requests, sent


@pytest.fixture(scope="module")
def population():
    return generate()


@pytest.fixture
async def site(aiohttp_client, settings, make_project, population, db):
    project = make_project("shop", domain="site.example", timezone=TZ)
    for goal in DECLARED:  # as `pulse goals add` declares them (tests/test_goals_cli.py runs it)
        add_goal(db, get_project(db, project.id), goal)
    client = await aiohttp_client(create_app(settings))
    for agent, events in population[0]:
        response = await client.post("/api/v1/events/ingest", json={"events": events},
                                     headers={"X-API-Key": project.ingest_key, "User-Agent": agent})
        assert response.status == 202, await response.text()

    async def get(endpoint: str, status: int = 200, **params):
        response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=params,
                                    headers={"Authorization": f"Bearer {project.read_token}"})
        assert response.status == status, await response.text()
        return await response.json()

    return client, project, get


# -- the recount --------------------------------------------------------------------------------------


def local_ms(text: str, end: bool = False) -> int:
    """A from/to value as the API reads it: a date is a whole day of the project's zone."""
    tz = ZoneInfo(TZ)
    if "T" in text:
        return int(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp() * 1000)
    day = datetime.fromisoformat(text).replace(tzinfo=tz) + (timedelta(days=1) if end else timedelta())
    return int(day.timestamp() * 1000)


def is_bot(item: Sent) -> bool:
    return parse_agent(item.agent).is_bot


def matching(sent: list[Sent], start: int, end: int, filters: dict) -> list[Sent]:
    found = []
    for item in sent:
        if is_bot(item) or not start <= item.ts < end:
            continue
        if "browser" in filters and BROWSERS[item.agent] != filters["browser"]:
            continue
        if "path" in filters and item.path != filters["path"]:
            continue
        if "event" in filters and item.name != filters["event"]:
            continue
        if "prop.plan" in filters and item.props.get("plan") != filters["prop.plan"]:
            continue
        found.append(item)
    return found


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def revenue(items: list[Sent]) -> list[dict]:
    sums: dict = defaultdict(Decimal)
    for item in items:
        value = item.props.get("revenue")
        if not number(value):
            value = item.props.get("amount")
        if not number(value):
            continue
        currency = item.props.get("currency")
        sums[currency.upper() if isinstance(currency, str) else None] += Decimal(str(value))
    return [{"currency": currency, "amount": float(amount)}
            for currency, amount in sorted(sums.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]


def page_goal(goal: str, path: str | None) -> bool:
    if path is None:
        return False
    return path.startswith(goal[:-1]) if goal.endswith("*") else path == goal


def expected_goals(sent: list[Sent], start: int, end: int, filters: dict) -> dict:
    found = matching(sent, start, end, filters)
    visitors = len({item.user for item in found})
    goals: dict[str, tuple[str, list[Sent]]] = {}
    for item in found:
        if item.name != "page_view" and not item.name.startswith("$"):
            goals.setdefault(item.name, ("event", []))[1].append(item)
    for goal in DECLARED:
        if goal.startswith("/"):
            goals[goal] = ("page", [i for i in found if i.name == "page_view" and page_goal(goal, i.path)])
        else:
            goals.setdefault(goal, ("event", []))
    rows = []
    for goal, (kind, items) in goals.items():
        users = len({item.user for item in items})
        rows.append({"goal": goal, "kind": kind, "visitors": users, "events": len(items),
                     "conversion_rate": round(users / visitors, 4) if visitors else 0.0,
                     "revenue": revenue(items)})
    rows.sort(key=lambda row: (-row["visitors"], row["goal"]))
    return {"visitors": visitors, "rows": rows}


WINDOWS = [
    ("2026-02-28", "2026-03-04"),  # whole days of the project's zone, every event
    ("2026-03-01T07:20:00", "2026-03-02T19:45:10"),  # cuts through hours at both ends
]
FILTERS = [{}, {"browser": "Firefox"}, {"path": "/thank-you"}, {"prop.plan": "pro"}, {"event": "purchase"}]


@pytest.mark.parametrize("start, end", WINDOWS)
@pytest.mark.parametrize("filters", FILTERS)
async def test_goals_match_a_recount(site, population, start, end, filters):
    _, project, get = site
    found = await get("goals", **{"from": start, "to": end, **filters})
    expected = expected_goals(population[1], local_ms(start), local_ms(end, end=True), filters)
    assert found["visitors"] == expected["visitors"] > 0
    assert found["rows"] == expected["rows"]
    shown = [datetime.fromtimestamp(ms / 1000, ZoneInfo(TZ)).isoformat() for ms in (local_ms(start), local_ms(end, True))]
    assert [found["project"], found["from"], found["to"]] == [project.id, *shown]


async def test_goals_agree_with_top_events_and_pages(site):
    _, _, get = site
    params = {"from": WINDOWS[1][0], "to": WINDOWS[1][1], "prop.plan": "free"}
    goals = {row["goal"]: row for row in (await get("goals", **params))["rows"]}
    events = {row["value"]: row for row in (await get("top-events", limit="100", **params))["rows"]}
    pages = {row["value"]: row for row in (await get("pages", limit="100", **params))["rows"]}
    for name in ("signup", "purchase", "click"):
        assert (goals[name]["events"], goals[name]["visitors"]) == (events[name]["count"], events[name]["unique_users"])
    assert (goals["/thank-you"]["events"], goals["/thank-you"]["visitors"]) == (
        pages["/thank-you"]["count"], pages["/thank-you"]["unique_users"])
    assert goals["/blog/*"]["events"] == pages["/blog/a"]["count"] + pages["/blog/b"]["count"]
    assert "$identify" not in goals and "page_view" not in goals


async def test_limit_keeps_the_first_rows(site, population):
    _, _, get = site
    found = await get("goals", limit="2", **{"from": WINDOWS[0][0], "to": WINDOWS[0][1]})
    expected = expected_goals(population[1], local_ms(WINDOWS[0][0]), local_ms(WINDOWS[0][1], end=True), {})
    assert found["rows"] == expected["rows"][:2]


def expected_bots(sent: list[Sent], start: int, end: int) -> list[dict]:
    events: dict[str, int] = defaultdict(int)
    users: dict[str, set] = defaultdict(set)
    for item in sent:
        if is_bot(item) and start <= item.ts < end:
            family = parse_agent(item.agent).browser
            events[family] += 1
            users[family].add(item.user)
    rows = [{"value": family, "count": count, "unique_users": len(users[family])} for family, count in events.items()]
    return sorted(rows, key=lambda row: (-row["count"], row["value"]))


@pytest.mark.parametrize("start, end", WINDOWS)
async def test_bots_report_what_every_number_leaves_out(site, population, start, end):
    _, _, get = site
    found = await get("bots", **{"from": start, "to": end})
    expected = expected_bots(population[1], local_ms(start), local_ms(end, end=True))
    assert {row["value"] for row in expected} == {"Googlebot", "bingbot"}
    assert found["rows"] == expected
    # and left out of the rest: the overview counts only people
    overview = await get("overview", **{"from": start, "to": end})
    people = matching(population[1], local_ms(start), local_ms(end, end=True), {})
    assert (overview["events"], overview["unique_users"]) == (len(people), len({i.user for i in people}))


async def test_bots_take_no_filters(site):
    _, _, get = site
    found = await get("bots", 400, range="7d", browser="Googlebot")
    assert found["field"] == "browser"
    assert (await get("bots", 400, range="7d", nonsense="1"))["field"] == "nonsense"


async def test_drop_in_crawlers_are_stored_as_bots(site, db):
    """A crawler through Plausible's and Umami's endpoints is answered as those products answer it, stored as
    a bot's, shown by the bots report and by no other number."""
    client, project, get = site
    before = await get("overview", range="24h")
    response = await client.post("/api/event", headers={"User-Agent": GOOGLEBOT}, data=(
        '{"n": "purchase", "u": "https://site.example/thank-you", "d": "site.example",'
        ' "p": {"revenue": 50, "currency": "EUR"}}'))
    assert (response.status, response.headers["x-plausible-dropped"]) == (202, "1")
    site_id = get_project(db, project.id).site_id
    response = await client.post("/api/send", headers={"User-Agent": BINGBOT}, json={
        "type": "event", "payload": {"website": site_id, "url": "/thank-you", "hostname": "site.example"}})
    assert (response.status, await response.json()) == (200, {"beep": "boop"})
    found = {row["value"]: row for row in (await get("bots", range="24h"))["rows"]}
    assert (found["Googlebot"]["count"], found["bingbot"]["count"]) == (1, 1)
    after = await get("overview", range="24h")
    numbers = ("events", "unique_users", "sessions", "live_visitors")
    assert [after[n] for n in numbers] == [before[n] for n in numbers] == [0, 0, 0, 0]
    goals = await get("goals", range="24h")
    assert goals["visitors"] == 0 and all(row["visitors"] == 0 and row["revenue"] == [] for row in goals["rows"])
