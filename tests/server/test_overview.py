"""The overview endpoint agrees with a recount of the raw events, also for ranges that cut through hours."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from tests.conftest import event, recount

HOUR = 3_600_000
BASE = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@pytest.fixture
async def seeded(client, project):
    rng = random.Random(3)
    events = []
    for _ in range(1500):
        user = rng.randrange(150)
        events.append(event(
            rng.choice(["page_view", "page_view", "click", "signup"]),
            distinct_id=f"u{user}", session_id=f"s{user}-{rng.randrange(4)}",
            timestamp=BASE + rng.randrange(72 * HOUR),
        ))
    for start in range(0, len(events), 100):
        response = await client.post("/api/v1/events/ingest", json={"events": events[start:start + 100]},
                                     headers={"X-API-Key": project.ingest_key})
        assert response.status == 202
    # a bot's events are stored but left out of visitor numbers
    response = await client.post(
        "/api/v1/events/ingest", json={"events": [event(distinct_id="crawler", timestamp=BASE + HOUR)]},
        headers={"X-API-Key": project.ingest_key,
                 "User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"},
    )
    assert response.status == 202
    return client


@pytest.mark.parametrize("start, end", [
    (BASE, BASE + 72 * HOUR),                      # whole hours
    (BASE + 17 * 60_000, BASE + 5 * HOUR + 1),     # cuts the first and the last hour
    (BASE + HOUR + 5, BASE + HOUR + 2_000_000),    # inside one hour
    (BASE + 30 * HOUR + 123_456, BASE + 71 * HOUR - 999),
])
async def test_overview_matches_recount(seeded, project, db, start, end):
    response = await seeded.get(
        f"/api/v1/projects/{project.id}/overview", params={"from": iso(start), "to": iso(end)},
        headers={"Authorization": f"Bearer {project.read_token}"},
    )
    assert response.status == 200
    body = await response.json()
    expected = recount(db, project.id, start, end)
    assert expected["events"] > 0
    assert {k: body[k] for k in expected} == expected
    assert body["from"] == datetime.fromtimestamp(start / 1000, tz=timezone.utc).isoformat()
    span = end - start
    assert {k: body["previous"][k] for k in expected} == recount(db, project.id, start - span, start)


async def test_overview_ranges_and_bad_parameters(seeded, project):
    headers = {"Authorization": f"Bearer {project.read_token}"}
    url = f"/api/v1/projects/{project.id}/overview"
    for name in ("24h", "7d", "30d", "90d"):
        assert (await seeded.get(url, params={"range": name}, headers=headers)).status == 200
    for params, field in [({"range": "1y"}, "range"), ({"from": "yesterday"}, "from"),
                          ({"from": "2026-03-02", "to": "2026-03-01"}, "to"), ({"to": "2026-03-01"}, "from")]:
        response = await seeded.get(url, params=params, headers=headers)
        assert response.status == 400, params
        assert (await response.json())["field"] == field


async def test_dates_are_whole_days_in_the_project_time_zone(seeded, project, db):
    response = await seeded.get(
        f"/api/v1/projects/{project.id}/overview", params={"from": "2026-03-01", "to": "2026-03-02"},
        headers={"Authorization": f"Bearer {project.read_token}"},
    )
    body = await response.json()
    assert body["events"] == recount(db, project.id, BASE, BASE + 48 * HOUR)["events"]


async def test_late_events_for_a_past_day_are_counted_after_that_day_was_read(client, project, db):
    """Whole days of rollups are cached between requests; events arriving late for such a day still count."""
    headers = {"Authorization": f"Bearer {project.read_token}"}
    window = {"from": "2026-03-01", "to": "2026-03-04"}

    async def read() -> tuple[dict, dict]:
        overview = await (await client.get(f"/api/v1/projects/{project.id}/overview", params=window,
                                           headers=headers)).json()
        top = await (await client.get(f"/api/v1/projects/{project.id}/top-events", params=window,
                                      headers=headers)).json()
        return overview, {r["value"]: (r["count"], r["unique_users"]) for r in top["rows"]}

    async def post(*events) -> None:
        response = await client.post("/api/v1/events/ingest", json={"events": list(events)},
                                     headers={"X-API-Key": project.ingest_key})
        assert response.status == 202

    await post(*[event("click", distinct_id=f"u{i}", timestamp=BASE + 26 * HOUR + i) for i in range(5)])
    first, top = await read()
    assert (first["events"], first["unique_users"], top["click"]) == (5, 5, (5, 5))
    await post(event("click", distinct_id="u0", timestamp=BASE + 30 * HOUR),  # a known user, the same day
               event("click", distinct_id="late", timestamp=BASE + 27 * HOUR))  # a new one
    again, top = await read()
    assert (again["events"], again["unique_users"], top["click"]) == (7, 6, (7, 6))
    start, end = BASE, BASE + 4 * 24 * HOUR
    assert recount(db, project.id, start, end)["events"] == 7


async def test_late_page_views_for_a_past_day_reach_the_page_breakdown(client, project):
    headers = {"Authorization": f"Bearer {project.read_token}"}
    window = {"from": "2026-03-01", "to": "2026-03-04"}

    async def pages() -> dict:
        body = await (await client.get(f"/api/v1/projects/{project.id}/pages", params=window, headers=headers)).json()
        return {r["value"]: (r["count"], r["unique_users"]) for r in body["rows"]}

    async def view(user: str, path: str, hour: int) -> None:
        response = await client.post("/api/v1/events/ingest", json={"events": [event(
            "page_view", distinct_id=user, page_url=f"https://site.example{path}", timestamp=BASE + hour * HOUR)]},
            headers={"X-API-Key": project.ingest_key})
        assert response.status == 202

    await view("a", "/docs", 30)
    assert await pages() == {"/docs": (1, 1)}
    await view("b", "/docs", 31)
    await view("a", "/pricing", 30)
    assert await pages() == {"/docs": (2, 2), "/pricing": (1, 1)}


async def test_sessions_of_a_cached_day_that_change_later_are_read_again(store_backend):
    """Session numbers are cached per start day; a later event of such a session (a second page, an earlier
    first event) changes bounce rate, duration, entry and exit pages, and may move the session's start day.
    On both stores (on the ClickHouse cluster, each request to the next of two nodes)."""
    project = await store_backend.project("site", domain="site.example")
    client = await store_backend.client()
    headers = {"Authorization": f"Bearer {project.read_token}"}
    window = {"from": "2026-02-28", "to": "2026-03-04"}
    posted: list[dict] = []

    async def post(*events) -> None:
        posted.extend(events)
        response = await client.post("/api/v1/events/ingest", json={"events": list(events)},
                                     headers={"X-API-Key": project.ingest_key})
        assert response.status == 202

    def view(session: str, user: str, path: str, ms: int, referrer: str | None = None) -> dict:
        return event("page_view", distinct_id=user, session_id=session, page_url=f"https://site.example{path}",
                     referrer=referrer, timestamp=ms)

    async def read() -> dict:
        found = {}
        for endpoint in ("overview", "entry-pages", "exit-pages", "referrers", "sessions"):
            body = await (await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=window,
                                           headers=headers)).json()
            if endpoint == "overview":
                found[endpoint] = (body["bounce_rate"], body["avg_session_seconds"], body["pages_per_session"])
            elif endpoint == "sessions":
                found[endpoint] = (body["aggregates"]["sessions"], len(body["rows"]))
            else:
                found[endpoint] = {r["value"]: (r["count"], r["unique_users"]) for r in body["rows"]}
        return found

    def expected() -> dict:
        """From the posted events alone: per session its first and last event and its page views."""
        by_session: dict[str, list[dict]] = {}
        for item in posted:
            by_session.setdefault(item["session_id"], []).append(item)
        entry, exit_, referrers = {}, {}, {}
        durations, bounces, pages = [], 0, 0
        for items in by_session.values():
            items.sort(key=lambda e: e["timestamp"])
            views = [e for e in items if e["event"] == "page_view"]
            durations.append((items[-1]["timestamp"] - items[0]["timestamp"]) / 1000)
            bounces += len(items) == 1
            pages += len(views)
            for table, chosen in ((entry, views[0]), (exit_, views[-1])):
                path = chosen["page_url"].removeprefix("https://site.example")
                table.setdefault(path, []).append(chosen["distinct_id"])
            if views[0].get("referrer"):
                referrers.setdefault("google.com", []).append(views[0]["distinct_id"])
        n = len(by_session)

        def rows(table: dict) -> dict:
            return {value: (len(users), len(set(users))) for value, users in table.items()}

        return {"overview": (round(bounces / n, 4), round(sum(durations) / n, 1), round(pages / n, 2)),
                "entry-pages": rows(entry), "exit-pages": rows(exit_), "referrers": rows(referrers),
                "sessions": (n, n)}

    day = BASE + 24 * HOUR  # 2026-03-02, a whole day of the window
    await post(view("s1", "a", "/a", day + 10 * HOUR, referrer="https://www.google.com/"),
               view("s2", "b", "/b", day + 30 * 60_000), view("s3", "a", "/a", day + 20 * HOUR))
    assert await read() == expected()
    await post(view("s1", "a", "/c", day + 10 * HOUR + 300_000),  # s1 is no longer a bounce; exits on /c
               view("s2", "b", "/z", day - 20 * 60_000))  # s2 now starts the day before, on /z
    again = await read()
    assert again == expected()
    assert again["entry-pages"] == {"/a": (2, 1), "/z": (1, 1)}
    assert again["exit-pages"] == {"/a": (1, 1), "/b": (1, 1), "/c": (1, 1)}


async def test_a_trait_set_after_a_filtered_day_was_read_changes_that_day(store_backend):
    """Filtered numbers are cached per day too; who has a trait is part of what a cached day is checked
    against, so a trait given later (by an event outside the window) still changes the answer. On both stores."""
    project = await store_backend.project("site", domain="site.example")
    client = await store_backend.client()
    headers = {"Authorization": f"Bearer {project.read_token}"}
    window = {"from": "2026-03-01", "to": "2026-03-04", "trait.plan": "pro"}

    async def post(*events) -> None:
        response = await client.post("/api/v1/events/ingest", json={"events": list(events)},
                                     headers={"X-API-Key": project.ingest_key})
        assert response.status == 202

    async def read() -> tuple:
        overview = await (await client.get(f"/api/v1/projects/{project.id}/overview", params=window,
                                           headers=headers)).json()
        pages = await (await client.get(f"/api/v1/projects/{project.id}/pages", params=window,
                                        headers=headers)).json()
        return overview["events"], overview["unique_users"], overview["sessions"], pages["rows"]

    day = BASE + 24 * HOUR
    await post(event("$identify", distinct_id="a", session_id="a1", traits={"plan": "pro"}, timestamp=day),
               *[event("page_view", distinct_id=user, session_id=f"{user}1", timestamp=day + HOUR + i,
                       page_url="https://site.example/docs") for i, user in enumerate("aabbb")])
    assert await read() == (3, 1, 1, [{"value": "/docs", "count": 2, "unique_users": 1}])
    await post(event("page_view", distinct_id="a", session_id="a2", timestamp=day + 5 * HOUR,
                     page_url="https://site.example/docs"))  # a late event in the day already read
    assert await read() == (4, 1, 2, [{"value": "/docs", "count": 3, "unique_users": 1}])
    await post(event("$identify", distinct_id="b", traits={"plan": "pro"}, timestamp=BASE + 10 * 24 * HOUR))
    assert await read() == (7, 2, 3, [{"value": "/docs", "count": 6, "unique_users": 2}])
    await post(event("$identify", distinct_id="a", traits={"plan": "free"}, timestamp=BASE + 10 * 24 * HOUR))
    assert await read() == (3, 1, 1, [{"value": "/docs", "count": 3, "unique_users": 1}])


async def test_the_start_up_warm_up_computes_recent_days_before_they_are_asked_for(aiohttp_client, settings, project):
    """A restarted server fills the readers' cache for the last days; /health says when it is done."""
    import asyncio
    import dataclasses
    import time

    from pulse.server.app import create_app
    from pulse.server.keys import STORE

    day = (time.time_ns() // 1_000_000 // (24 * HOUR) - 2) * 24 * HOUR  # two days ago, a whole UTC day
    first = await aiohttp_client(create_app(dataclasses.replace(settings, warm_days=0)))
    response = await first.post("/api/v1/events/ingest", json={"events": [
        event("page_view", distinct_id=f"u{i}", session_id=f"s{i}", timestamp=day + i * HOUR) for i in range(5)]},
        headers={"X-API-Key": project.ingest_key})
    assert response.status == 202
    assert (await (await first.get("/health")).json())["warmed_up"] is True  # nothing to do
    await first.close()

    def cached(client, kind: str) -> list[tuple]:
        """The keys of one kind of entry in the day cache of the client's server."""
        return [key for key in client.app[STORE].reader.days._entries if key[:3] == (str(settings.db_path), project.id, kind)]

    assert day // (24 * HOUR) not in {key[-1] for key in cached(first, "sessions")}
    again = await aiohttp_client(create_app(dataclasses.replace(settings, warm_days=3)))
    for _ in range(200):
        if (await (await again.get("/health")).json())["warmed_up"]:
            break
        await asyncio.sleep(0.05)
    assert day // (24 * HOUR) in {key[-1] for key in cached(again, "sessions")}
    people = {key[3] // 24 for key in cached(again, "people")}
    assert day // (24 * HOUR) in people  # what trait filters are answered from
    body = await (await again.get(f"/api/v1/projects/{project.id}/overview", params={"range": "7d"},
                                  headers={"Authorization": f"Bearer {project.read_token}"})).json()
    assert (body["events"], body["sessions"], body["bounce_rate"]) == (5, 5, 1.0)
