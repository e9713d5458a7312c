"""Share tokens on the real app: what they read, their live feed, expiry, and the dashboard's files and headers."""

from __future__ import annotations

import asyncio
import gzip
import re
from pathlib import Path

import pytest

from pulse.server.app import create_app
from pulse.storage.sqlite.projects import get_project
from pulse.storage.sqlite.shares import create_share, revoke_share

WEB = Path(__file__).resolve().parents[2] / "pulse" / "web"
BUDGET = 60 * 1024  # bytes, the page, its stylesheet and its script gzipped
POLICY = re.compile(r"default-src 'self'; script-src 'self'; style-src 'self'; .*frame-ancestors 'none'")


@pytest.fixture
async def client(aiohttp_client, settings, make_project):
    project = make_project("site")
    client = await aiohttp_client(create_app(settings))
    client.project = project
    return client


async def status(client, path: str, token: str) -> int:
    response = await client.get(f"/api/v1/projects/{client.project.id}/{path}", headers={"Authorization": f"Bearer {token}"})
    if response.status != 200:
        assert "error" in await response.json()
    return response.status


async def until(client, path: str, token: str, wanted: int) -> int:
    for _ in range(200):
        found = await status(client, path, token)
        if found == wanted:
            return found
        await asyncio.sleep(0.05)
    return found


async def test_a_share_token_reads_the_dashboards_aggregates_and_nothing_else(client, db):
    _, token = create_share(db, get_project(db, client.project.id))
    assert await until(client, "overview", token, 200) == 200
    for path in ("timeseries?interval=day", "top-events", "pages", "entry-pages", "exit-pages", "referrers",
                 "utm?dimension=campaign", "browsers", "os", "devices", "countries", "languages", "screens", "goals"):
        assert await status(client, path, token) == 200, path
    for path in ("events", "users", "users/u1", "sessions", "properties", "properties/plan", "traits",
                 "traits/gender", "bots"):
        assert await status(client, path, token) == 403, path
    listed = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {token}"})
    assert [p["id"] for p in (await listed.json())["projects"]] == [client.project.id]
    # it cannot send events either
    sent = await client.post("/api/v1/events/ingest", json={"events": [{"event": "x"}]}, headers={"X-API-Key": token})
    assert sent.status == 403


async def test_an_expired_share_token_is_refused_and_its_feed_closed(client, db):
    _, token = create_share(db, get_project(db, client.project.id), expires_in_s=2)
    assert await until(client, "overview", token, 200) == 200
    ws = await client.ws_connect(f"/api/v1/ws/events/{client.project.id}", protocols=("pulse.bearer", token))
    assert (await ws.receive_json())["type"] == "hello"
    closed = await ws.receive(timeout=10)
    assert ws.close_code == 4001, closed
    assert await status(client, "overview", token) == 401


async def test_a_share_feed_carries_name_path_and_time_only_and_ends_when_revoked(client, db):
    project = get_project(db, client.project.id)
    row, token = create_share(db, project)
    assert await until(client, "overview", token, 200) == 200
    ws = await client.ws_connect(f"/api/v1/ws/events/{project.id}", protocols=("pulse.bearer", token))
    assert ws.protocol == "pulse.bearer"
    assert (await ws.receive_json())["type"] == "hello"
    sent = await client.post("/api/v1/events/ingest", headers={"X-API-Key": client.project.ingest_key}, json={
        "events": [{"event": "signup", "distinct_id": "alice", "page_url": "https://site.example/join",
                    "properties": {"plan": "pro"}, "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Firefox/121.0"}]})
    assert sent.status == 202
    message = await ws.receive_json(timeout=10)
    assert message["type"] == "events"
    assert [set(e) for e in message["events"]] == [{"event", "ts", "path"}]
    assert message["events"][0]["path"] == "/join"
    revoke_share(db, project, str(row["id"]))
    await ws.receive(timeout=10)
    assert ws.close_code == 4001
    assert await status(client, "overview", token) == 401


async def test_the_page_and_its_files_carry_the_policy_and_fit_the_budget(client):
    total = 0
    for path, kind in (("/dashboard/1", "text/html"), ("/static/web/dashboard.css", "text/css"),
                       ("/static/web/dashboard.js", "application/javascript")):
        response = await client.get(path)
        assert response.status == 200 and response.content_type == kind
        assert POLICY.match(response.headers["Content-Security-Policy"]), response.headers["Content-Security-Policy"]
        total += len(gzip.compress(await response.read(), 9))
    assert total <= BUDGET, total
    assert (await client.get("/static/web/other.js")).status == 404
    assert (await client.get("/dashboard/x")).status == 404
    index = await (await client.get("/")).text()
    assert 'href="/dashboard/"' in index and 'href="/demo/"' in index and 'href="/docs"' in index
    assert (await client.get("/docs")).status == 200


def test_no_inline_code_and_no_html_parsing_of_values():
    page = (WEB / "dashboard.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", page) and not re.search(r"\son[a-z]+\s*=", page, re.I)
    assert "style=" not in page
    script = (WEB / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
