"""Funnels, retention and paths on the ClickHouse store (one 18.16 server behind two `pulse serve` nodes, a
two-shard cluster behind two nodes, chdb in-process): the funnels tests' population (Asia/Kolkata, shuffled
out-of-order batches, persons who identify halfway, crawlers) goes in through the real ingest API, and every
answer must equal both the plain-Python recount of tests/server and the SQLite store's answer for the same
events, on every node. On chdb the rows are read in slices of a few dozen, so the slicing by person and by
session is checked too (the servers read each question's rows at once). Events of one millisecond count in the order they were stored, as on SQLite."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from pulse.config import Settings
from pulse.server.app import create_app
from pulse.storage.base import open_store
from pulse.storage.clickhouse import journeys
from tests.clickhouse.test_store_core import _store_url, clickhouse, nodes, read, send
from tests.clickhouse_servers import MISSING
from tests.server.test_funnels import (
    DAYS_WINDOW, FUNNELS, HOURS_WINDOW, MINUTE, SECOND, TZ, answer, bound, expected_funnel, overall, population, shop,
)
from tests.server.test_paths import CASES as PATH_CASES, tree, walks
from tests.server.test_retention import CASES as RETENTION_CASES, expected_retention

__all__ = ["clickhouse", "population", "shop"]  # the fixtures, shared

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

BACKENDS = ["single", "cluster", "chdb"]
RANGES = (DAYS_WINDOW, HOURS_WINDOW)
HOUR = 60 * MINUTE
SMALL_SLICE = 37  # rows per slice on chdb: several slices per question


def _same(found: dict, reference: dict) -> bool:
    """Equal answers but for the project's id (each store numbers its own)."""
    return {k: v for k, v in found.items() if k != "project"} == {k: v for k, v in reference.items() if k != "project"}


async def _project(url: str, tmp_path, name: str):
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        return await store.create_project(name, domain="shop.example", timezone=TZ)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_journeys_match_a_recount_and_the_sqlite_store(backend, clickhouse, tmp_path, population, shop,
                                                             monkeypatch):
    batches, sent = population
    if backend == "chdb":
        monkeypatch.setattr(journeys, "CHUNK_ROWS", SMALL_SLICE)
    url = _store_url(backend, clickhouse, tmp_path)
    project, ingest_key, read_token = await _project(url, tmp_path, "shop")
    checked = 0
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for i, batch in enumerate(batches):
            status, body = await send(session, urls[i % len(urls)], ingest_key, batch)
            assert status == 202, body

        async def same_everywhere(endpoint: str, params: dict, expected) -> dict:
            """The answer of every node, equal to the SQLite store's; `expected(answer)` checks the recount."""
            nonlocal checked
            reference = await shop(endpoint, params=params)
            for node in urls:
                status, found = await read(session, node, project.id, read_token, endpoint, **params)
                assert status == 200, found
                assert _same(found, reference), (endpoint, params)
                expected(found)
            checked += 1
            return found

        for start, end in RANGES:
            span = {"from": start, "to": end}
            for steps in FUNNELS:
                for window in ("1h", "1d", "7d"):
                    want = overall(sent, steps, window, bound(start), bound(end, True), {})
                    await same_everywhere("funnel", {"steps": ",".join(steps), "window": window, **span},
                                          lambda found, want=want: found["steps"] == want)
            want = overall(sent, FUNNELS[0], "1d", bound(start), bound(end, True), {"browser": "Firefox"})
            await same_everywhere("funnel", {"steps": ",".join(FUNNELS[0]), "browser": "Firefox", **span},
                                  lambda found, want=want: found["steps"] == want)
            groups = expected_funnel(sent, FUNNELS[1], "1d", bound(start), bound(end, True), {}, "browser")
            want = [{"value": value, "steps": answer(FUNNELS[1], reached)} for value, reached in
                    sorted(groups.items(), key=lambda item: (-len(item[1][0]), item[0] is None, item[0] or ""))]
            found = await same_everywhere("funnel", {"steps": ",".join(FUNNELS[1]), "breakdown": "browser", **span},
                                          lambda found, want=want: found["breakdown"] == want)
            assert len(found["breakdown"]) == 2
            for filters in ({}, {"browser": "Chrome"}):
                for period, periods, start_event, return_event in RETENTION_CASES:
                    params = {"period": period, "periods": str(periods), **filters, **span}
                    params.update({k: v for k, v in (("start_event", start_event), ("return_event", return_event))
                                   if v})
                    want = expected_retention(sent, period, periods, start_event, return_event, bound(start),
                                              bound(end, True), filters)
                    await same_everywhere("retention", params, lambda found, want=want: found["cohorts"] == want)
            for filters in ({}, {"browser": "Firefox"}):
                for asked, step, depth, limit in PATH_CASES:
                    walked = walks(sent, step, bound(start), bound(end, True), filters)
                    want = tree(asked if not asked.startswith("/") else step, walked, 0, depth, limit)
                    await same_everywhere("paths", {"start": asked, "depth": str(depth), "limit": str(limit),
                                                    **filters, **span},
                                          lambda found, want=want: found["root"] == want)
        # something was counted, and the retention windows reach back before the first cohort
        status, found = await read(session, urls[0], project.id, read_token, "funnel",
                                   steps=",".join(FUNNELS[0]), **{"from": DAYS_WINDOW[0], "to": DAYS_WINDOW[1]})
        assert found["steps"][0]["persons"] > 0 and found["steps"][1]["persons"] > 0
    assert checked == 2 * (len(FUNNELS) * 3 + 2 + 2 * len(RETENTION_CASES) + 2 * len(PATH_CASES))


def _one_millisecond_story(base: int) -> list[dict]:
    """Requests, one event each, sent in this order. ada views pricing anonymously, identifies, signs up: one
    person who converts. bob signs up before viewing pricing. cy's two steps share a millisecond, pricing
    stored first (its uuid the larger: a uuid order alone would reverse them); dee's share one too, signup
    stored first. eve's signup arrives before the pricing view that came earlier."""
    same_cy, same_dee = base + 5 * SECOND, base + 7 * SECOND
    return [
        {"event": "page_view", "distinct_id": "anon-1", "page_url": "https://shop.example/pricing?utm_source=news",
         "timestamp": base},
        {"event": "$identify", "distinct_id": "ada", "anon_id": "anon-1", "timestamp": base + MINUTE},
        {"event": "signup", "distinct_id": "ada", "timestamp": base + 2 * MINUTE},
        {"event": "signup", "distinct_id": "bob", "timestamp": base},
        {"event": "page_view", "distinct_id": "bob", "page_url": "https://shop.example/pricing?utm_source=ads",
         "timestamp": base + MINUTE},
        {"event": "page_view", "distinct_id": "cy", "page_url": "https://shop.example/pricing", "timestamp": same_cy,
         "uuid": "ffffffff-0000-4000-8000-000000000001"},
        {"event": "signup", "distinct_id": "cy", "timestamp": same_cy, "uuid": "00000000-0000-4000-8000-000000000001"},
        {"event": "signup", "distinct_id": "dee", "timestamp": same_dee, "uuid": "00000000-0000-4000-8000-000000000002"},
        {"event": "page_view", "distinct_id": "dee", "page_url": "https://shop.example/pricing", "timestamp": same_dee,
         "uuid": "ffffffff-0000-4000-8000-000000000002"},
        {"event": "signup", "distinct_id": "eve", "timestamp": base + 30 * MINUTE},
        {"event": "page_view", "distinct_id": "eve", "page_url": "https://shop.example/pricing",
         "timestamp": base + 10 * MINUTE},
    ]


def _local(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(TZ)).strftime("%Y-%m-%dT%H:%M:%S")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_identify_mid_funnel_and_events_of_one_millisecond(backend, clickhouse, tmp_path, aiohttp_client,
                                                                 settings, make_project):
    base = (int(time.time() * 1000) - 3 * HOUR) // SECOND * SECOND
    story = _one_millisecond_story(base)
    span = {"from": _local(base - HOUR), "to": _local(base + 2 * HOUR)}
    queries = [("funnel", {"steps": "page_view:/pricing,signup", "window": "1h", **span}),
               ("paths", {"start": "/pricing", "depth": "3", **span}),
               ("retention", {"period": "day", "periods": "2", "start_event": "page_view", "return_event": "signup",
                              **span})]
    sqlite_project = make_project("solo", timezone=TZ)
    client = await aiohttp_client(create_app(settings))
    for body in story:
        response = await client.post("/api/v1/events/ingest", json={"events": [body]},
                                     headers={"X-API-Key": sqlite_project.ingest_key})
        assert response.status == 202
    reference = {}
    for endpoint, params in queries:
        response = await client.get(f"/api/v1/projects/{sqlite_project.id}/{endpoint}", params=params,
                                    headers={"Authorization": f"Bearer {sqlite_project.read_token}"})
        assert response.status == 200
        reference[endpoint] = await response.json()
    by_source = {**queries[0][1], "breakdown": "utm_source"}  # of the first step's session: its first page view's
    response = await client.get(f"/api/v1/projects/{sqlite_project.id}/funnel", params=by_source,
                                headers={"Authorization": f"Bearer {sqlite_project.read_token}"})
    reference_by_source = await response.json()
    assert {group["value"] for group in reference_by_source["breakdown"]} >= {"news", "ads", None}
    url = _store_url(backend, clickhouse, tmp_path)
    project, ingest_key, read_token = await _project(url, tmp_path, "solo")
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for body in story:  # to one node, one request after another: the order they are stored in
            assert (await send(session, urls[0], ingest_key, [body]))[0] == 202
        found = {}
        for endpoint, params in queries:
            for node in urls:
                status, found[endpoint] = await read(session, node, project.id, read_token, endpoint, **params)
                assert status == 200, found[endpoint]
                assert _same(found[endpoint], reference[endpoint]), endpoint
        for node in urls:
            status, body = await read(session, node, project.id, read_token, "funnel", **by_source)
            assert status == 200 and _same(body, reference_by_source), body
    # ada, bob, cy, dee, eve view pricing; ada (120 s, across her identify), cy (0 s) and eve (1200 s) sign up
    assert [(s["persons"], s["median_seconds"]) for s in found["funnel"]["steps"]] == [(5, None), (3, 120.0)]
    root = found["paths"]["root"]
    assert (root["sessions"], root["dropped"]) == (5, 2)
    assert [(n["step"], n["sessions"]) for n in root["next"]] == [("signup", 2), ("$identify", 1)]
    assert root["next"][1]["next"][0]["step"] == "signup"
