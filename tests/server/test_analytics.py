"""Every read endpoint against an independent recount of a deterministic, generated population.

The expected numbers are computed here from the generated events themselves, never from the database.
The project is in Asia/Kolkata (UTC+5:30), so its days cut through UTC hours. Every test runs on both stores
(`store_backend`): SQLite, and a two-shard ClickHouse cluster behind two `pulse serve` nodes.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

TZ = "Asia/Kolkata"
HOUR = 3_600_000
BASE = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1000)
AGENTS = {  # user agent -> (browser, os, device); the last is a bot and must not be counted
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36":
        ("Chrome", "Windows", "desktop"),
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 "
    "Mobile/15E148 Safari/604.1": ("Mobile Safari", "iOS", "mobile"),
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0": ("Firefox", "Linux", "desktop"),
}
BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
PAGES = ["/", "/pricing", "/docs", "/blog/launch", "/signup"]
REFERRERS = [None, "https://www.google.com/search?q=pulse", "https://twitter.com/x", "https://site.example/docs"]


@dataclass
class Sent:
    name: str
    ts: int
    user: int  # the person: anon-N and user-N are one person once identified
    session: str
    agent: str
    path: str | None = None
    referrer: str | None = None  # domain, self-referrals dropped
    utm_source: str | None = None
    props: dict | None = None


def generate(seed: int = 5) -> tuple[list[dict], list[Sent], dict[int, dict]]:
    """Request bodies (with their user agent) and what each event is, plus each person's traits."""
    rng = random.Random(seed)
    requests, sent, traits = [], [], {}
    for user in range(80):
        agent = rng.choice(list(AGENTS))
        traits[user] = {"age_group": rng.choice(["<18", "18-40", ">40"]), "gender": rng.choice(["Male", "Female", "Other"])}
        identified = False
        for number in range(rng.randint(1, 4)):
            session = f"s{user}-{number}"
            ts = BASE + rng.randrange(4 * 24 * HOUR)
            events = []
            source = rng.choice([None, None, "news", "ads"])
            referrer = rng.choice(REFERRERS)
            for step in range(rng.randint(1, 6)):
                distinct = f"user-{user}" if identified else f"anon-{user}"
                if step == 0 or rng.random() < 0.5:
                    path = rng.choice(PAGES)
                    url = f"https://site.example{path}" + (f"?utm_source={source}" if step == 0 and source else "")
                    body = {"event": "page_view", "distinct_id": distinct, "page_url": url}
                    item = Sent("page_view", ts, user, session, agent, path=path,
                                utm_source=source if step == 0 else None)
                    if step == 0 and referrer:
                        body["referrer"] = referrer
                        domain = referrer.split("/")[2].removeprefix("www.")
                        item.referrer = None if domain == "site.example" else domain
                else:
                    name = rng.choice(["click", "click", "signup", "purchase"])
                    plan = rng.choice(["free", "pro"])
                    body = {"event": name, "distinct_id": distinct, "properties": {"plan": plan}}
                    item = Sent(name, ts, user, session, agent, props={"plan": plan})
                body.update(uuid=str(uuid.uuid4()), session_id=session, timestamp=ts)
                events.append(body)
                sent.append(item)
                if not identified and step == 0 and number == 0:
                    identified = True  # identify right after the first page view
                    ts += 1000
                    events.append({"event": "$identify", "distinct_id": f"user-{user}", "anon_id": f"anon-{user}",
                                   "traits": traits[user], "uuid": str(uuid.uuid4()), "session_id": session,
                                   "timestamp": ts})
                    sent.append(Sent("$identify", ts, user, session, agent))
                ts += rng.randrange(5_000, 400_000)
            requests.append({"agent": agent, "events": events})
    bot_events = [{"event": "page_view", "distinct_id": "crawler", "session_id": "bot", "page_url": "https://site.example/",
                   "uuid": str(uuid.uuid4()), "timestamp": BASE + i * HOUR} for i in range(30)]
    requests.append({"agent": BOT, "events": bot_events})
    return requests, sent, traits


@pytest.fixture(scope="module")
def population():
    return generate()


@pytest.fixture
async def api(store_backend, population):
    """The population sent to the store (on the cluster once for the module: these tests only read)."""
    async def send(client, project) -> None:
        requests, _, _ = population
        for request in requests:
            response = await client.post("/api/v1/events/ingest", json={"events": request["events"]},
                                         headers={"X-API-Key": project.ingest_key, "User-Agent": request["agent"]})
            assert response.status == 202, await response.text()

    client, project = await store_backend.loaded(send, name="shop", domain="site.example", timezone=TZ)

    async def get(endpoint: str, **params):
        response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=params,
                                    headers={"Authorization": f"Bearer {project.read_token}"})
        assert response.status == 200, await response.text()
        return await response.json()

    return get


# -- the independent recount ------------------------------------------------------------------------


def matches(item: Sent, traits: dict[int, dict], filters: dict) -> bool:
    browser, os_name, device = AGENTS[item.agent]
    checks = {
        "event": item.name, "path": item.path, "browser": browser, "os": os_name, "device": device,
        "prop.plan": (item.props or {}).get("plan"),
        "trait.gender": traits[item.user]["gender"], "trait.age_group": traits[item.user]["age_group"],
    }
    return all(checks[key] == value for key, value in filters.items() if key != "utm_source")


def in_window(sent: list[Sent], start: int, end: int, traits, filters: dict) -> list[Sent]:
    found = [e for e in sent if start <= e.ts < end and matches(e, traits, filters)]
    if "utm_source" in filters:  # of the event's session: the source of its first page view
        table = session_table(sent)
        found = [e for e in found if table[e.session]["source"] == filters["utm_source"]]
    return found


def session_table(sent: list[Sent]) -> dict[str, dict]:
    sessions: dict[str, dict] = {}
    for item in sorted(sent, key=lambda e: e.ts):
        s = sessions.setdefault(item.session, {"first": item.ts, "last": item.ts, "events": 0, "pageviews": 0,
                                               "entry": None, "exit": None, "referrer": None, "source": None,
                                               "user": item.user})
        s["last"] = item.ts
        s["events"] += 1
        if item.name == "page_view":
            if s["pageviews"] == 0:
                s["entry"], s["referrer"], s["source"] = item.path, item.referrer, item.utm_source
            s["pageviews"] += 1
            s["exit"] = item.path
    return sessions


def expected_totals(sent, traits, start, end, filters):
    found = in_window(sent, start, end, traits, filters)
    return {"events": len(found), "unique_users": len({e.user for e in found}),
            "sessions": len({e.session for e in found})}


def expected_sessions(sent, traits, start, end, filters):
    """Sessions that started in the window and, with filters, hold a matching event in it."""
    table = session_table(sent)
    wanted = {e.session for e in in_window(sent, start, end, traits, filters)} if filters else None
    return {k: s for k, s in table.items() if start <= s["first"] < end and (wanted is None or k in wanted)}


def counted(rows: dict[str, list[int]]) -> list[dict]:
    result = [{"value": value, "count": len(users), "unique_users": len(set(users))} for value, users in rows.items()]
    return sorted(result, key=lambda r: (-r["count"], r["value"]))


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


WINDOWS = [
    (BASE - HOUR, BASE + 5 * 24 * HOUR),                       # everything
    (BASE + 7 * HOUR + 1_234_567, BASE + 50 * HOUR + 99_999),  # cuts through hours at both ends
    (BASE + 30 * HOUR + 5, BASE + 30 * HOUR + 2_500_000),      # inside one hour
]
FILTERS = [{}, {"event": "click"}, {"trait.gender": "Female"}, {"prop.plan": "pro"}, {"browser": "Firefox"},
           {"path": "/pricing"}, {"trait.age_group": "18-40", "device": "desktop"}, {"utm_source": "news"},
           {"trait.age_group": ">40", "trait.gender": "Male"}]


@pytest.mark.parametrize("start, end", WINDOWS)
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f) or "none")
async def test_overview_and_top_events(api, population, start, end, filters):
    _, sent, traits = population
    body = await api("overview", **{"from": iso(start), "to": iso(end)}, **filters)
    expected = expected_totals(sent, traits, start, end, filters)
    assert {k: body[k] for k in expected} == expected
    assert {k: body["previous"][k] for k in expected} == expected_totals(sent, traits, 2 * start - end, start, filters)

    sessions = expected_sessions(sent, traits, start, end, filters)
    if sessions:
        assert body["bounce_rate"] == round(sum(s["events"] == 1 for s in sessions.values()) / len(sessions), 4)
        assert body["avg_session_seconds"] == round(
            sum(s["last"] - s["first"] for s in sessions.values()) / len(sessions) / 1000, 1)
        assert body["pages_per_session"] == round(sum(s["pageviews"] for s in sessions.values()) / len(sessions), 2)

    by_name: dict[str, list[int]] = defaultdict(list)
    for item in in_window(sent, start, end, traits, filters):
        by_name[item.name].append(item.user)
    rows = counted(by_name)
    assert body["distinct_events"] == len(rows)
    assert body["top_event"] == ({"event": rows[0]["value"], "count": rows[0]["count"]} if rows else None)
    top = await api("top-events", **{"from": iso(start), "to": iso(end), "limit": "50"}, **filters)
    assert top["rows"] == rows


@pytest.mark.parametrize("filters", FILTERS[:4], ids=lambda f: ",".join(f) or "none")
@pytest.mark.parametrize("interval", ["hour", "day"])
async def test_timeseries_buckets_in_the_project_time_zone(api, population, filters, interval):
    _, sent, traits = population
    start, end = WINDOWS[1] if interval == "hour" else (BASE - 2 * HOUR, BASE + 4 * 24 * HOUR + 7 * HOUR)
    body = await api("timeseries", **{"from": iso(start), "to": iso(end), "interval": interval}, **filters)
    tz = ZoneInfo(TZ)
    edges = [start]
    moment = datetime.fromtimestamp(start / 1000, tz=tz)
    moment = moment.replace(minute=0, second=0, microsecond=0) if interval == "hour" else moment.replace(
        hour=0, minute=0, second=0, microsecond=0)
    while True:
        moment += timedelta(hours=1) if interval == "hour" else timedelta(days=1)
        ms = int(moment.timestamp() * 1000)
        if ms >= end:
            break
        edges.append(ms)
    edges.append(end)
    expected = [expected_totals(sent, traits, a, b, filters) for a, b in zip(edges, edges[1:])]
    assert [{k: row[k] for k in ("events", "unique_users", "sessions")} for row in body["buckets"]] == expected
    assert sum(row["events"] for row in body["buckets"]) == expected_totals(sent, traits, start, end, filters)["events"]
    if interval == "day":  # midnights in Kolkata are 18:30 UTC
        assert all(row["start"].endswith("+05:30") for row in body["buckets"])
        # the window opens at 03:30 on 1 March in Kolkata: a partial first day, then whole days
        assert [row["start"] for row in body["buckets"][:2]] == ["2026-03-01T03:30:00+05:30", "2026-03-02T00:00:00+05:30"]
    shift = end - start
    assert [r["events"] for r in body["previous"]] == [
        expected_totals(sent, traits, a - shift, b - shift, filters)["events"] for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("start, end", WINDOWS[:2])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f) or "none")
async def test_breakdowns(api, population, start, end, filters):
    _, sent, traits = population
    window = {"from": iso(start), "to": iso(end), "limit": "100"}
    found = in_window(sent, start, end, traits, filters)
    pages: dict[str, list[int]] = defaultdict(list)
    browsers, systems, devices = defaultdict(list), defaultdict(list), defaultdict(list)
    for item in found:
        if item.name == "page_view":
            pages[item.path].append(item.user)
        browser, os_name, device = AGENTS[item.agent]
        browsers[browser].append(item.user)
        systems[os_name].append(item.user)
        devices[device].append(item.user)
    assert (await api("pages", **window, **filters))["rows"] == counted(pages)
    assert (await api("browsers", **window, **filters))["rows"] == counted(browsers)
    assert (await api("os", **window, **filters))["rows"] == counted(systems)
    assert (await api("devices", **window, **filters))["rows"] == counted(devices)

    sessions = expected_sessions(sent, traits, start, end, filters)
    for endpoint, key, extra in [("entry-pages", "entry", {}), ("exit-pages", "exit", {}),
                                 ("referrers", "referrer", {}), ("utm", "source", {"dimension": "source"})]:
        rows: dict[str, list[int]] = defaultdict(list)
        for s in sessions.values():
            if s[key] is not None:
                rows[s[key]].append(s["user"])
        assert (await api(endpoint, **window, **extra, **filters))["rows"] == counted(rows), endpoint


async def test_limit_caps_the_rows(api):
    rows = (await api("top-events", **{"from": iso(WINDOWS[0][0]), "to": iso(WINDOWS[0][1]), "limit": "2"}))["rows"]
    assert len(rows) == 2


@pytest.mark.parametrize("params, field", [
    ({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"colour": "red"}, "colour"),
    ({"interval": "week"}, "interval"), ({"dimension": "weather"}, "dimension"), ({"event": ["a", "b"]}, "event"),
])
async def test_bad_parameters_are_400_naming_them(store_backend, params, field):
    project = await store_backend.project()
    client = await store_backend.client()
    endpoint = "utm" if "dimension" in params else "timeseries" if "interval" in params else "top-events"
    query = [(k, v) for k, values in params.items() for v in ([values] if isinstance(values, str) else values)]
    response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=query,
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 400
    assert (await response.json())["field"] == field


async def all_pages(api, endpoint: str, **params) -> tuple[list[dict], dict]:
    rows, cursor, first = [], None, None
    while True:
        body = await api(endpoint, **params, **({"cursor": cursor} if cursor else {}))
        first = first or body
        rows.extend(body["rows"] if "rows" in body else body["events"])
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, first


@pytest.mark.parametrize("filters", [{}, {"trait.gender": "Female"}, {"event": "signup"}],
                         ids=lambda f: ",".join(f) or "none")
async def test_sessions_list_and_aggregates(api, population, filters):
    _, sent, traits = population
    start, end = WINDOWS[1]
    expected = expected_sessions(sent, traits, start, end, filters)
    rows, first = await all_pages(api, "sessions", **{"from": iso(start), "to": iso(end), "limit": "7"}, **filters)
    assert first["aggregates"]["sessions"] == len(expected)
    assert len(rows) == len(expected) and {r["session_id"] for r in rows} == set(expected)
    assert [r["first_ts"] for r in rows] == sorted((r["first_ts"] for r in rows), reverse=True)
    for row in rows:
        s = expected[row["session_id"]]
        assert (row["first_ts"], row["last_ts"], row["events"], row["pageviews"], row["entry_page"], row["exit_page"],
                row["referrer"], row["utm_source"]) == (s["first"], s["last"], s["events"], s["pageviews"], s["entry"],
                                                        s["exit"], s["referrer"], s["source"])
        assert row["distinct_id"] == f"user-{s['user']}"  # the identified id, also for the anonymous start


@pytest.mark.parametrize("filters", [{}, {"trait.age_group": ">40"}, {"browser": "Firefox"}],
                         ids=lambda f: ",".join(f) or "none")
async def test_identified_users(api, population, filters):
    """The users with a matching event in the window; their events in it that match, and their lifetime."""
    _, sent, traits = population
    start, end = WINDOWS[1]
    per_user: dict[int, list[int]] = defaultdict(list)
    for item in sent:
        per_user[item.user].append(item.ts)
    matching: dict[int, int] = defaultdict(int)
    for item in in_window(sent, start, end, traits, filters):
        matching[item.user] += 1
    expected = {f"user-{u}": (min(per_user[u]), max(per_user[u]), count, len(per_user[u]))
                for u, count in matching.items()}
    rows, _ = await all_pages(api, "users", **{"from": iso(start), "to": iso(end), "limit": "9"}, **filters)
    assert {r["distinct_id"]: (r["first_seen"], r["last_seen"], r["window_events"], r["lifetime_events"])
            for r in rows} == expected
    assert all(r["traits"] == traits[int(r["distinct_id"][5:])] for r in rows)
    assert [r["last_seen"] for r in rows] == sorted((r["last_seen"] for r in rows), reverse=True)


@pytest.mark.parametrize("start, end", WINDOWS)
@pytest.mark.parametrize("user", [3, 17, 42])
async def test_one_users_timeline_by_either_id(api, population, start, end, user):
    _, sent, _ = population
    mine = sorted((e.ts, e.name) for e in sent if e.user == user and start <= e.ts < end)[::-1]
    for distinct_id in (f"user-{user}", f"anon-{user}"):
        rows, first = await all_pages(api, f"users/{distinct_id}", **{"from": iso(start), "to": iso(end),
                                                                     "limit": "4"})
        assert first["user"]["distinct_id"] == f"user-{user}"
        assert first["user"]["lifetime_events"] == sum(e.user == user for e in sent)
        assert first["user"]["window_events"] == len(mine)
        assert [(r["ts"], r["event"]) for r in rows] == mine


async def test_unknown_user_is_404(store_backend):
    project = await store_backend.project()
    client = await store_backend.client()
    response = await client.get(f"/api/v1/projects/{project.id}/users/nobody",
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 404


@pytest.mark.parametrize("filters", [{}, {"browser": "Chrome"}, {"trait.gender": "Other"}],
                         ids=lambda f: ",".join(f) or "none")
async def test_raw_events_paginate_newest_first(api, population, filters):
    _, sent, traits = population
    start, end = WINDOWS[1]
    rows, _ = await all_pages(api, "events", **{"from": iso(start), "to": iso(end), "limit": "25"}, **filters)
    expected = sorted(((e.ts, e.name) for e in in_window(sent, start, end, traits, filters)), reverse=True)
    assert [(r["ts"], r["event"]) for r in rows] == expected
    assert len({r["uuid"] for r in rows}) == len(rows)


@pytest.mark.parametrize("start, end", WINDOWS[:2])
@pytest.mark.parametrize("filters", [{}, {"event": "purchase"}, {"trait.gender": "Female"}, {"utm_source": "news"},
                                     {"trait.age_group": "18-40", "trait.gender": "Female"}],
                         ids=lambda f: ",".join(f) or "none")
async def test_property_keys_and_values(api, population, start, end, filters):
    _, sent, traits = population
    window = {"from": iso(start), "to": iso(end)}
    with_props = [e for e in in_window(sent, start, end, traits, filters) if e.props]
    keys = await api("properties", **window, **filters)
    assert keys["rows"] == ([{"value": "plan", "count": len(with_props),
                              "unique_users": len({e.user for e in with_props})}] if with_props else [])
    values: dict[str, list[int]] = defaultdict(list)
    for item in with_props:
        values[item.props["plan"]].append(item.user)
    assert (await api("properties/plan", **window, **filters))["rows"] == counted(values)


@pytest.mark.parametrize("filters", [{}, {"browser": "Chrome"}, {"trait.age_group": "<18"}],
                         ids=lambda f: ",".join(f) or "none")
async def test_trait_keys_and_values_count_the_users_of_the_window(api, population, filters):
    """Persons with a matching event in the window (not those whose first-to-last span merely overlaps it)."""
    _, sent, traits = population
    start, end = WINDOWS[1]
    active = {e.user for e in in_window(sent, start, end, traits, filters)}
    window = {"from": iso(start), "to": iso(end)}
    keys = await api("traits", **window, **filters)
    assert keys["rows"] == [{"value": k, "count": len(active), "unique_users": len(active)}
                            for k in ("age_group", "gender")]
    genders: dict[str, int] = defaultdict(int)
    for user in active:
        genders[traits[user]["gender"]] += 1
    rows = (await api("traits/gender", **window, **filters))["rows"]
    assert {r["value"]: r["count"] for r in rows} == genders
    assert [r["count"] for r in rows] == sorted(genders.values(), reverse=True)


