"""Breakdowns, the bots report and goals on the ClickHouse store (one 18.16 server, a two-shard cluster behind two
`pulse serve` nodes, chdb in-process): visitors with several browsers, systems and devices (and two crawlers),
countries from their addresses, languages, screen widths, referrers, UTM-tagged landing pages, client and
inferred sessions, identifies, custom events with revenue and declared path goals, sent through the real ingest.
Every breakdown must equal a recount in plain Python of the events sent AND the SQLite store's answer for the same
events: unfiltered, under an event filter and under a path filter."""

from __future__ import annotations

import json
import random
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from pulse.config import Settings
from pulse.storage.base import open_store
from tests.clickhouse.test_store_core import _store_url, clickhouse, nodes, read  # noqa: F401 (a fixture)
from tests.clickhouse_servers import MISSING
from tests.servers import Server, pulse

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

MINUTE = 60_000
HOUR = 60 * MINUTE
GAP = 30 * MINUTE
NOW = int(datetime.now(timezone.utc).timestamp()) * 1000  # whole seconds: the window's end as the API reads it
START = NOW - 24 * HOUR
WINDOW = {key: datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
          for key, ms in (("from", START), ("to", NOW))}
# user agent: (browser, OS, device, crawler)
AGENTS = {
    "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0": ("Firefox", "Linux", "desktop", False),
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
    " Safari/537.36": ("Chrome", "Windows", "desktop", False),
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5"
    " Mobile/15E148 Safari/604.1": ("Mobile Safari", "iOS", "mobile", False),
    "Mozilla/5.0 (Linux; Android 13; SM-X200) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
    " Safari/537.36": ("Chrome", "Android", "tablet", False),
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)": ("Googlebot", "Other", "bot", True),
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)": ("bingbot", "Other", "bot", True),
}
# addresses whose country the data bundled with geoip2fast knows; the private one has none
COUNTRY_OF = {"8.8.8.8": "US", "81.2.69.160": "GB", "5.6.7.8": "DE", "10.1.2.3": None, "2001:67c:2e8::1": "NL"}
LANGUAGES = ["en-US", "de-DE", "pt-BR", "fr", None]
WIDTHS = [375, 800, 1280, 2560, None, 1000, 500]
PAGES = ["/", "/pricing", "/blog/a", "/blog/b", "/thank-you", "/docs"]
LANDINGS = [
    ("https://shop.example/", None),
    ("https://shop.example/pricing?utm_source=news&utm_medium=email&utm_campaign=spring", None),
    ("https://shop.example/blog/a?utm_source=social&utm_medium=cpc", "https://www.social.example/post/1"),
    ("https://shop.example/?utm_campaign=launch", "https://search.example/?q=shop"),
    ("https://shop.example/docs", "https://shop.example/pricing"),  # a self-referral is no referrer
    ("https://shop.example/pricing", "https://news.example/today"),
]
GOALS = ["/thank-you", "/blog/*", "newsletter", "/never"]  # declared; signup and purchase are goals undeclared
FILTERS = [{}, {"event": "signup"}, {"path": "/pricing"}]
SESSION_ENDPOINTS = {"entry-pages": "entry", "exit-pages": "exit", "referrers": "referrer",
                     "utm_source": "utm_source", "utm_medium": "utm_medium", "utm_campaign": "utm_campaign"}
EVENT_ENDPOINTS = ("pages", "browsers", "os", "devices", "countries", "languages", "screens")


def generated() -> list[dict]:
    """Events of 18 visitors over the last 26 hours, in time order (the newest 15 minutes old; some before the
    window, some in sessions that started before it): each its own user agent, address, language and screen,
    one to three visits more than two hours apart of events a few minutes apart, each visit opened by a landing
    page (now and then after a click), client session ids for a third of the visitors, an identify for a
    quarter of them; signups and purchases with revenue."""
    rng = random.Random(11)
    events = []
    agents, ips = list(AGENTS), list(COUNTRY_OF)
    for k in range(18):
        agent, ip = agents[k % len(agents)], ips[k % len(ips)]
        language, width = LANGUAGES[k % len(LANGUAGES)], WIDTHS[k % len(WIDTHS)]
        anon, identified = f"anon{k}", k % 4 == 1
        ts = NOW - 26 * HOUR + rng.randrange(0, 4 * HOUR)
        step = 0
        for visit in range(rng.randrange(1, 4)):
            ts += rng.randrange(2 * HOUR, 9 * HOUR) if visit else 0
            landing, referrer = rng.choice(LANDINGS)
            page = urlsplit(landing).path
            kinds = (["click"] if rng.random() < 0.25 else []) + ["landing"] + [
                rng.choice(["page_view", "page_view", "click", "signup", "purchase"]) for _ in range(rng.randrange(6))]
            for kind in kinds:
                ts += rng.randrange(1, 10) * MINUTE + rng.randrange(1000)
                if ts > NOW - 15 * MINUTE:
                    break
                event = {"event": "page_view" if kind == "landing" else kind, "uuid": str(uuid.uuid4()),
                         "distinct_id": f"user{k}" if identified and step >= 2 else anon, "timestamp": ts,
                         "user_agent": agent, "ip": ip, "page_url": f"https://shop.example{page}"}
                if identified and step == 2:
                    event["anon_id"] = anon
                if k % 3 == 0:
                    event["session_id"] = f"s{k}-{visit}"
                if language is not None:
                    event["language"] = language
                if width is not None:
                    event["screen_width"] = width
                if kind == "landing":
                    event["page_url"] = landing
                    if referrer is not None:
                        event["referrer"] = referrer
                elif kind == "page_view":
                    page = rng.choice(PAGES)
                    event["page_url"] = f"https://shop.example{page}"
                    if page == "/thank-you":
                        event["properties"] = {"revenue": 10, "currency": "usd"}
                elif kind == "signup":
                    event["properties"] = {"revenue": rng.choice([19.99, 5, 0.1]), "currency": rng.choice(["usd", "EUR"])}
                elif kind == "purchase":
                    event["properties"] = rng.choice([{"amount": 12.5}, {"revenue": "7", "amount": 3, "currency": "gbp"},
                                                      {"revenue": True, "plan": "pro"}])
                events.append(event)
                step += 1
    events.sort(key=lambda event: event["timestamp"])
    # nothing within a minute of the window's start: the recount need not know how the API rounds it
    return [event for event in events if abs(event["timestamp"] - START) > MINUTE]


def annotated(events: list[dict]) -> list[dict]:
    """Each event with what pulse should make of it: person, session, path, browser..., country, language,
    screen class, referrer domain and UTM values."""
    person: dict[str, str] = {}
    last: dict[str, tuple[int, tuple]] = {}  # person -> (last time, inferred session)
    found = []
    for event in events:
        ts = event["timestamp"]
        if "anon_id" in event:
            person[event["distinct_id"]] = person.get(event["anon_id"], event["anon_id"])
        who = person.setdefault(event["distinct_id"], event["distinct_id"])
        if "session_id" in event:
            session = ("key", event["session_id"])
        else:
            previous = last.get(who)
            session = previous[1] if previous and ts - previous[0] <= GAP else ("auto", who, ts)
            last[who] = (ts, session)
        url = urlsplit(event["page_url"])
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        referrer = urlsplit(event["referrer"]).hostname if "referrer" in event else None
        if referrer is not None:
            referrer = referrer.removeprefix("www.")
            referrer = None if referrer == "shop.example" else referrer
        width, language = event.get("screen_width"), event.get("language")
        browser, os_name, device, bot = AGENTS[event["user_agent"]]
        found.append({**event, "person": who, "session": session, "path": url.path or "/", "browser": browser,
                      "os": os_name, "device": device, "bot": bot, "country": COUNTRY_OF[event["ip"]],
                      "language": language.split("-")[0].lower() if language else None,
                      "screen": None if width is None else "mobile" if width < 576 else "tablet" if width < 992
                      else "laptop" if width < 1440 else "desktop",
                      "referrer_domain": referrer, **{key: query.get(key) for key in
                                                      ("utm_source", "utm_medium", "utm_campaign")}})
    return found


def _in(event: dict) -> bool:
    return START <= event["timestamp"] < NOW


def _matches(event: dict, filters: dict) -> bool:
    return (not event["bot"] and _in(event) and event["event"] == filters.get("event", event["event"])
            and event["path"] == filters.get("path", event["path"]))


def _ranked(counted: dict) -> list[list]:
    """[value, count, users] rows of {value: [count, users]}, ranked as pulse ranks them."""
    return sorted(([value, n, len(users)] for value, (n, users) in counted.items()), key=lambda r: (-r[1], r[0]))


def expected_breakdown(events: list[dict], endpoint: str, filters: dict) -> list[list]:
    counted: dict = defaultdict(lambda: [0, set()])
    if endpoint in EVENT_ENDPOINTS:
        field = {"pages": "path", "browsers": "browser", "devices": "device", "countries": "country",
                 "languages": "language", "screens": "screen"}.get(endpoint, endpoint)
        for event in events:
            if _matches(event, filters) and (endpoint != "pages" or event["event"] == "page_view"):
                if event[field] is not None:
                    counted[event[field]][0] += 1
                    counted[event[field]][1].add(event["person"])
        return _ranked(counted)
    sessions: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        sessions[event["session"]].append(event)
    for session in sessions.values():
        views = [event for event in session if event["event"] == "page_view"]
        first = session[0]
        if not START <= first["timestamp"] < NOW or first["bot"] or not views:
            continue
        if filters and not any(_matches(event, filters) for event in session):
            continue
        kind = SESSION_ENDPOINTS[endpoint]
        value = views[-1]["path"] if kind == "exit" else views[0]["path"] if kind == "entry" else views[0][
            "referrer_domain" if kind == "referrer" else kind]
        if value is not None:
            counted[value][0] += 1
            counted[value][1].add(first["person"])
    return _ranked(counted)


def expected_bots(events: list[dict]) -> list[list]:
    counted: dict = defaultdict(lambda: [0, set()])
    for event in events:
        if event["bot"] and _in(event):
            counted[event["browser"]][0] += 1
            counted[event["browser"]][1].add(event["person"])
    return _ranked(counted)


def _amount(properties: dict) -> tuple[Decimal, str | None] | None:
    for key in ("revenue", "amount"):
        value = properties.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            currency = properties.get("currency")
            return Decimal(str(value)), currency.upper() if isinstance(currency, str) else None
    return None


def expected_goals(events: list[dict], filters: dict) -> dict:
    matching = [event for event in events if _matches(event, filters)]
    reached: dict[str, list] = {}  # goal -> [kind, events, users, {currency: sum}]
    for event in matching:
        name = event["event"]
        if name != "page_view":
            reached.setdefault(name, ["event", 0, set(), defaultdict(Decimal)])
    for goal in GOALS:
        reached.setdefault(goal, ["page" if goal.startswith("/") else "event", 0, set(), defaultdict(Decimal)])
    for event in matching:
        if event["event"] == "page_view":
            goals = [goal for goal in GOALS if goal.startswith("/") and (
                event["path"].startswith(goal[:-1]) if goal.endswith("*") else event["path"] == goal)]
        else:
            goals = [event["event"]]
        amount = _amount(event.get("properties", {}))
        for goal in goals:
            reached[goal][1] += 1
            reached[goal][2].add(event["person"])
            if amount is not None:
                reached[goal][3][amount[1]] += amount[0]
    visitors = len({event["person"] for event in matching})
    rows = [{"goal": goal, "kind": kind, "visitors": len(users), "events": n,
             "conversion_rate": round(len(users) / visitors, 4) if visitors else 0.0,
             "revenue": [{"currency": currency, "amount": float(total)} for currency, total in
                         sorted(sums.items(), key=lambda item: (item[0] is None, item[0] or ""))]}
            for goal, (kind, n, users, sums) in reached.items()]
    rows.sort(key=lambda row: (-row["visitors"], row["goal"]))
    return {"visitors": visitors, "rows": rows}


def questions() -> list[tuple[str, str, dict]]:
    """(name, endpoint, parameters) of every answer compared."""
    found = [("bots", "bots", {"limit": "100"})]
    for filters in FILTERS:
        for endpoint in (*EVENT_ENDPOINTS, "entry-pages", "exit-pages", "referrers"):
            found.append((endpoint, endpoint, {"limit": "100", **filters}))
        for dimension in ("source", "medium", "campaign"):
            found.append((f"utm_{dimension}", "utm", {"limit": "100", "dimension": dimension, **filters}))
        found.append(("goals", "goals", dict(filters)))
    return found


def batches(events: list[dict]) -> list[list[dict]]:
    return [events[i:i + 9] for i in range(0, len(events), 9)]


async def ask_all(session: aiohttp.ClientSession, url: str, project: int, token: str) -> list[dict]:
    found = []
    for _, endpoint, params in questions():
        status, body = await read(session, url, project, token, endpoint, **WINDOW, **params)
        assert status == 200, (endpoint, params, body)
        body.pop("project")
        found.append(body)
    return found


_SQLITE: list[dict] = []  # the SQLite store's answers, asked once for the module


async def sqlite_answers(tmp_path_factory, events: list[dict]) -> list[dict]:
    if not _SQLITE:
        data_dir = tmp_path_factory.mktemp("sqlite-reference") / "data"
        project = json.loads(pulse("projects", "create", "shop", "--json", data_dir=data_dir).stdout)
        for goal in GOALS:
            pulse("goals", "add", "shop", goal, data_dir=data_dir)
        server = Server(data_dir, log_path=data_dir.parent / "sqlite.log")
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                for batch in batches(events):
                    async with session.post(f"{server.url}/api/v1/events/ingest", json={"events": batch},
                                            headers={"X-API-Key": project["ingest_key"]}) as response:
                        assert response.status == 202, await response.text()
                _SQLITE.extend(await ask_all(session, server.url, project["id"], project["read_token"]))
        finally:
            server.stop(15)
    return _SQLITE


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_breakdowns_bots_and_goals_match_a_recount_and_the_sqlite_store(backend, clickhouse, tmp_path,
                                                                               tmp_path_factory):
    events = generated()
    url = _store_url(backend, clickhouse, tmp_path)
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        project, ingest_key, read_token = await store.create_project("shop")
        for goal in GOALS:
            await store.add_goal(project, goal)
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for i, batch in enumerate(batches(events)):
            async with session.post(f"{urls[i % len(urls)]}/api/v1/events/ingest", json={"events": batch},
                                    headers={"X-API-Key": ingest_key}) as response:
                assert response.status == 202, await response.text()
        found = [await ask_all(session, node, project.id, read_token) for node in urls]
    assert all(answers == found[0] for answers in found)  # every node answers alike
    facts = annotated(events)
    for (name, endpoint, params), body in zip(questions(), found[0]):
        filters = {key: value for key, value in params.items() if key in ("event", "path")}
        if name == "goals":
            assert {"visitors": body["visitors"], "rows": body["rows"]} == expected_goals(facts, filters), filters
        else:
            expected = expected_bots(facts) if name == "bots" else expected_breakdown(facts, name, filters)
            assert [[row["value"], row["count"], row["unique_users"]] for row in body["rows"]] == expected, (
                name, filters)
    reference = await sqlite_answers(tmp_path_factory, events)
    for (name, _, params), mine, theirs in zip(questions(), found[0], reference):
        assert mine == theirs, (name, params)


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_page_views_tied_at_a_sessions_edge_answer_501_not_a_guess(backend, clickhouse, tmp_path):
    """A batch of page views without timestamps shares one millisecond: SQLite's entry page is the first of them
    and its exit page the last, an order ClickHouse does not keep, so entry and exit pages answer 501; a
    breakdown the tie does not change (the referrer, the same for all) and the event-level ones still answer."""
    url = _store_url(backend, clickhouse, tmp_path)
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        project, ingest_key, read_token = await store.create_project("shop")
    tied = [{"event": "page_view", "distinct_id": "u1", "session_id": "k1", "page_url": f"https://shop.example/{p}",
             "referrer": "https://news.example/"} for p in ("a", "b", "c")]
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        async with session.post(f"{urls[0]}/api/v1/events/ingest", json={"events": tied},
                                headers={"X-API-Key": ingest_key}) as response:
            assert response.status == 202, await response.text()
        for endpoint in ("entry-pages", "exit-pages"):
            status, body = await read(session, urls[-1], project.id, read_token, endpoint, range="24h")
            assert status == 501 and "same millisecond" in body["error"], (endpoint, body)
        status, body = await read(session, urls[-1], project.id, read_token, "referrers", range="24h")
        assert (status, body["rows"]) == (200, [{"value": "news.example", "count": 1, "unique_users": 1}])
        status, body = await read(session, urls[-1], project.id, read_token, "pages", range="24h")
        assert status == 200 and [row["count"] for row in body["rows"]] == [1, 1, 1]
