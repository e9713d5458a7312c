"""`pulse goals add|list|remove` through the real CLI, and the goals they declare read back from a real
`pulse serve` while it runs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp

from tests.servers import Server, read_api


def created(run, *args: str) -> dict:
    result = run("projects", "create", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def failed(result) -> str:
    """The one line a refused command prints, after checking it exited 1."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_add_list_remove_round_trip(run):
    created(run, "shop")
    assert run("goals", "add", "shop", "/thank-you").output == "added page goal /thank-you to project shop\n"
    assert run("goals", "add", "shop", "/blog/*").exit_code == 0
    added = json.loads(run("goals", "add", "shop", "signup", "--json").output)
    assert (added["project"], added["goal"], added["kind"]) == ("shop", "signup", "event")
    listed = json.loads(run("goals", "list", "shop", "--json").output)
    assert [(g["goal"], g["kind"]) for g in listed["goals"]] == [
        ("/blog/*", "page"), ("/thank-you", "page"), ("signup", "event")]
    text = run("goals", "list", "shop").output
    assert "/thank-you  page" in text and "signup      event" in text

    assert "already has the goal '/thank-you'" in failed(run("goals", "add", "shop", "/thank-you"))
    for goal in ("page_view", "$identify", "/blog/*/x", "/a b", " signup", "x" * 201, ""):
        assert "goal" in failed(run("goals", "add", "shop", goal)), goal
    assert failed(run("goals", "add", "nowhere", "/x")) == "error: no project 'nowhere'"
    assert failed(run("goals", "list", "nowhere")) == "error: no project 'nowhere'"

    assert run("goals", "remove", "shop", "signup").output == "removed goal signup from project shop\n"
    assert "has no goal 'signup'" in failed(run("goals", "remove", "shop", "signup"))
    assert [g["goal"] for g in json.loads(run("goals", "list", "shop", "--json").output)["goals"]] == [
        "/blog/*", "/thank-you"]


def test_at_most_100_goals_and_200_characters(run):
    created(run, "shop")
    assert run("goals", "add", "shop", "e" * 200).exit_code == 0
    for number in range(99):
        assert run("goals", "add", "shop", f"/page-{number}").exit_code == 0
    assert "100 goals" in failed(run("goals", "add", "shop", "/one-more"))
    assert len(json.loads(run("goals", "list", "shop", "--json").output)["goals"]) == 100


def test_goals_of_a_deleted_project_go_with_it(run):
    created(run, "shop")
    assert run("goals", "add", "shop", "/thank-you").exit_code == 0
    assert run("projects", "delete", "shop", "--yes").exit_code == 0
    created(run, "shop")
    assert json.loads(run("goals", "list", "shop", "--json").output)["goals"] == []


async def test_declared_goals_reach_a_running_server(run, tmp_path):
    """Goals declared before the server starts and removed while it runs: each read takes them as they are."""
    project = await asyncio.to_thread(created, run, "shop", "--timezone", "Europe/Berlin")
    for goal in ("/thank-you", "/blog/*", "newsletter"):
        assert (await asyncio.to_thread(run, "goals", "add", "shop", goal)).exit_code == 0
    server = Server(tmp_path / "data")
    await server.start()
    try:
        now = time.time_ns() // 1_000_000
        events = [
            {"event": "page_view", "distinct_id": "a", "page_url": "https://shop.example/thank-you"},
            {"event": "page_view", "distinct_id": "b", "page_url": "https://shop.example/blog/one"},
            {"event": "page_view", "distinct_id": "a", "page_url": "https://shop.example/blog/two"},
            {"event": "purchase", "distinct_id": "a", "properties": {"revenue": 9.5, "currency": "eur"}},
            {"event": "purchase", "distinct_id": "c", "properties": {"amount": 3}},
        ]
        for number, body in enumerate(events):
            body.update(uuid=str(uuid.uuid4()), timestamp=now - 60_000 + number)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/api/v1/events/ingest", json={"events": events},
                                    headers={"X-API-Key": project["ingest_key"]}) as response:
                assert response.status == 202, await response.text()
        found = await read_api(server, project, "goals")
        assert found["visitors"] == 3
        assert found["rows"] == [
            {"goal": "/blog/*", "kind": "page", "visitors": 2, "events": 2, "conversion_rate": 0.6667, "revenue": []},
            {"goal": "purchase", "kind": "event", "visitors": 2, "events": 2, "conversion_rate": 0.6667,
             "revenue": [{"currency": "EUR", "amount": 9.5}, {"currency": None, "amount": 3.0}]},
            {"goal": "/thank-you", "kind": "page", "visitors": 1, "events": 1, "conversion_rate": 0.3333,
             "revenue": []},
            {"goal": "newsletter", "kind": "event", "visitors": 0, "events": 0, "conversion_rate": 0.0,
             "revenue": []},
        ]
        assert (await asyncio.to_thread(run, "goals", "remove", "shop", "/blog/*")).exit_code == 0
        again = await read_api(server, project, "goals")
        assert [row["goal"] for row in again["rows"]] == ["purchase", "/thank-you", "newsletter"]
    finally:
        server.stop(15)
