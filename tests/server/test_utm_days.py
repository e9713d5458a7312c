"""UTM filters are answered from the day cache like any other filter, yet a session whose first page view
arrives late (and brings the UTM values) is counted under them at once."""

from __future__ import annotations

import time

from tests.conftest import event, read

HOUR = 3_600_000
DAY = 24 * HOUR


async def post(client, project, events: list[dict]) -> None:
    response = await client.post("/api/v1/events/ingest", json={"events": events},
                                 headers={"X-API-Key": project.ingest_key})
    assert response.status == 202, await response.text()


async def test_a_late_first_page_view_moves_its_session_under_its_utm_values(client, project):
    day = (int(time.time() * 1000) // DAY - 3) * DAY  # a whole UTC day, three days ago
    await post(client, project, [
        event("page_view", distinct_id="a", session_id="sa", timestamp=day + 10 * HOUR,
              page_url="https://shop.example/?utm_source=news"),
        event("click", distinct_id="a", session_id="sa", timestamp=day + 10 * HOUR + 60_000),
        event("page_view", distinct_id="b", session_id="sb", timestamp=day + DAY + 10 * 60_000,
              page_url="https://shop.example/pricing"),
        event("click", distinct_id="b", session_id="sb", timestamp=day + DAY + 11 * 60_000),
        event("click", distinct_id="b", session_id="sb", timestamp=day + DAY + 12 * 60_000),
    ])
    asked = {"range": "7d", "utm_source": "news"}
    for _ in range(2):  # the second answer comes from the day cache
        found = await read(client, project, "overview", **asked)
        assert (found["events"], found["unique_users"]) == (2, 1)
        assert {row["value"]: row["count"] for row in (await read(client, project, "top-events", **asked))["rows"]} \
            == {"page_view": 1, "click": 1}
    # b's session gets an earlier page view with a UTM source, on the day before the rest of it: its first page
    # view, so the session's source now, while the next day (cached) keeps the same events
    await post(client, project, [event("page_view", distinct_id="b", session_id="sb", timestamp=day + DAY - 10 * 60_000,
                                       page_url="https://shop.example/?utm_source=news")])
    found = await read(client, project, "overview", **asked)
    assert (found["events"], found["unique_users"]) == (6, 2)
    assert {row["value"]: row["count"] for row in (await read(client, project, "top-events", **asked))["rows"]} \
        == {"page_view": 3, "click": 3}
    buckets = (await read(client, project, "timeseries", interval="day", **asked))["buckets"]
    assert sum(bucket["events"] for bucket in buckets) == 6
