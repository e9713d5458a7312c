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
