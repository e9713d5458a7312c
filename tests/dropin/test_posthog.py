"""PostHog's capture API: its bodies decoded, its answers given; posthog-python and posthog-js (in Chromium)
sending to a real `pulse serve` with only their host changed, counted exactly through the read API."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiohttp import web

from tests.servers import Server, chromium, free_port, read_api, serving

ROOT = Path(__file__).resolve().parents[2]
POSTHOG_JS = ROOT / "node_modules" / "posthog-js" / "dist" / "array.full.js"
ORIGIN = "https://shop.example"
CHROME_UA = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
             " Safari/537.36")


def posthog_event(key: str, name: str = "signup", **properties) -> dict:
    return {"event": name, "uuid": str(uuid.uuid4()),
            "properties": {"token": key, "distinct_id": "anon-1", **properties}}


async def stored(client, project) -> list[dict]:
    response = await client.get(f"/api/v1/projects/{project.id}/events", params={"range": "24h"},
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 200, await response.text()
    return (await response.json())["rows"]


def assert_posthog_error(body: dict, kind: str, code: str) -> None:
    assert body["type"] == kind and body["code"] == code and body["detail"] and body["attr"] is None, body


# -- decoding and answers, in process ------------------------------------------------------------------


async def test_gzip_by_magic_bytes_maps_a_pageview(client, project):
    event = posthog_event(project.ingest_key, "$pageview", **{
        "$current_url": "https://site.example/pricing?utm_source=news", "$referrer": "https://ref.example/a",
        "$session_id": "s-1", "$raw_user_agent": CHROME_UA, "$browser": "Chrome", "plan": "pro"})
    body = gzip.compress(json.dumps({"api_key": project.ingest_key, "batch": [event],
                                     "sent_at": datetime.now(timezone.utc).isoformat()}).encode())
    # as current posthog-js sends it: text/plain, no compression hint
    response = await client.post("/e/", data=body, headers={"Content-Type": "text/plain", "Origin": ORIGIN})
    assert response.status == 200
    assert await response.json() == {"status": 1}
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    [row] = await stored(client, project)
    assert (row["event"], row["uuid"], row["distinct_id"]) == ("page_view", event["uuid"], "anon-1")
    assert (row["path"], row["referrer"], row["browser"]) == ("/pricing", "https://ref.example/a", "Chrome")
    # the key, and the fields pulse keeps in columns (or never, as the user agent), are not properties
    assert row["properties"] == {"plan": "pro", "$browser": "Chrome"}


async def test_content_encoding_gzip_as_posthog_python_sends_it(client, project):
    batch = {"api_key": project.ingest_key, "batch": [posthog_event(project.ingest_key)]}
    body = gzip.compress(json.dumps(batch).encode())
    response = await client.post("/batch/", data=body, headers={"Content-Type": "application/json",
                                                                  "Content-Encoding": "gzip"})
    assert response.status == 200, await response.text()
    assert [r["event"] for r in await stored(client, project)] == ["signup"]


async def test_form_data_base64_and_get_data(client, project):
    form_event = posthog_event(project.ingest_key, "from_form")
    encoded = base64.b64encode(json.dumps([form_event]).encode()).decode()
    response = await client.post("/e/?compression=base64", data={"data": encoded})  # urlencoded: + becomes %2B
    assert response.status == 200, await response.text()
    get_event = posthog_event(project.ingest_key, "from_get")
    response = await client.get("/i/v0/e/", params={"data": base64.b64encode(json.dumps(get_event).encode()).decode()})
    assert response.status == 200, await response.text()
    assert sorted(r["event"] for r in await stored(client, project)) == ["from_form", "from_get"]


@pytest.mark.parametrize("path, body, headers", [
    ("/e/?compression=base64", "data=%%%not-base64", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("/batch/", b"\x1f\x8b\x08\x00broken gzip", {"Content-Type": "text/plain"}),
    ("/e/?compression=gzip-js", b'{"event": "x"}', {"Content-Type": "text/plain"}),
    ("/e/?compression=lz64", "data=N4Ig", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("/capture/", b"{not json", {"Content-Type": "application/json"}),
    ("/e/", b"", {}),
])
async def test_undecodable_body_is_a_400_in_posthogs_shape(client, path, body, headers):
    response = await client.post(path, data=body, headers={"Origin": ORIGIN, **headers})
    assert response.status == 400
    assert_posthog_error(await response.json(), "validation_error", "invalid_payload")
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_missing_unknown_or_several_keys_are_401(client, project, make_project):
    other = make_project("other")
    cases = [
        ({"event": "x", "distinct_id": "a"}, "missing_api_key"),
        ({"event": "x", "distinct_id": "a", "token": "pk_unknown"}, "invalid_api_key"),
        ([posthog_event(project.ingest_key), posthog_event(other.ingest_key)], "invalid_api_key"),
        ({"event": "x", "distinct_id": "a", "token": project.read_token}, "permission_denied"),
    ]
    for body, code in cases:
        response = await client.post("/batch", json=body, headers={"Origin": ORIGIN})
        assert response.status in (401, 403), await response.text()
        assert_posthog_error(await response.json(), "authentication_error", code)
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert await stored(client, project) == []


async def test_key_in_every_place_posthog_puts_it(client, project):
    key = project.ingest_key
    for body in ({"event": "a", "distinct_id": "u", "api_key": key}, {"event": "b", "distinct_id": "u", "$token": key},
                 {"event": "c", "distinct_id": "u", "token": key}, posthog_event(key, "d"),
                 {"token": key, "batch": [{"event": "e", "distinct_id": "u"}]}):
        response = await client.post("/track/", json=body)
        assert response.status == 200, await response.text()
    assert sorted(r["event"] for r in await stored(client, project)) == ["a", "b", "c", "d", "e"]


async def test_missing_distinct_id_and_bad_uuid_are_400(client, project):
    response = await client.post("/e/", json={"event": "x", "token": project.ingest_key})
    assert response.status == 400
    assert_posthog_error(await response.json(), "validation_error", "missing_distinct_id")
    response = await client.post("/e/", json={**posthog_event(project.ingest_key), "uuid": "nope"})
    assert response.status == 400
    assert_posthog_error(await response.json(), "validation_error", "invalid_payload")


async def test_beacon_answers_204(client, project):
    response = await client.post("/e/?beacon=1", data=json.dumps(posthog_event(project.ingest_key)),
                                 headers={"Content-Type": "text/plain", "Origin": ORIGIN})
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert len(await stored(client, project)) == 1


@pytest.mark.parametrize("path", ["/e/", "/i/v0/e", "/batch/", "/flags/", "/decide", "/array/pk_x/config"])
async def test_preflight_mirrors_the_origin_and_headers(client, path):
    response = await client.options(path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-custom"})
    assert response.status == 200
    headers = response.headers
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "x-custom"} <= allowed


async def test_gzip_bomb_is_refused_within_the_body_limit(client, project, settings):
    bomb = gzip.compress(b" " * (settings.max_body_bytes * 8))
    assert len(bomb) < settings.max_body_bytes
    response = await client.post("/e/", data=bomb, headers={"Content-Type": "text/plain"})
    assert response.status == 413
    assert_posthog_error(await response.json(), "validation_error", "payload_too_large")


async def test_offset_and_timestamp_with_sent_at_give_the_event_time(client, project):
    now = datetime.now(timezone.utc)
    skewed = now + timedelta(hours=3)  # the client's clock is three hours fast
    batch = {"api_key": project.ingest_key, "sent_at": skewed.isoformat(), "batch": [
        {"event": "by_offset", "distinct_id": "u", "offset": 60_000},
        {"event": "by_timestamp", "distinct_id": "u", "timestamp": (skewed - timedelta(minutes=5)).isoformat()},
    ]}
    before = time.time() * 1000
    response = await client.post("/batch/", json=batch)
    after = time.time() * 1000
    assert response.status == 200
    times = {r["event"]: r["ts"] for r in await stored(client, project)}
    assert before - 60_000 - 1 <= times["by_offset"] <= after - 60_000 + 1
    assert before - 300_000 - 1 <= times["by_timestamp"] <= after - 300_000 + 1


async def test_properties_over_pulses_limits_are_trimmed_not_refused(client, project):
    properties = {f"$extra_{i}": i for i in range(80)} | {f"own_{i}": i for i in range(10)}
    properties |= {"long": "x" * 5000, "k" * 200: 1, "list": [1, 2], "$set": {"plan": "pro"}}
    response = await client.post("/e/", json=posthog_event(project.ingest_key, **properties))
    assert response.status == 200, await response.text()
    [row] = await stored(client, project)
    kept = row["properties"]
    assert len(kept) == 64
    assert {f"own_{i}" for i in range(10)} <= set(kept)  # the client's own come before PostHog's `$` ones
    assert len(kept["long"]) == 1024 and kept["list"] == "[1,2]" and "k" * 200 not in kept and "$set" not in kept


async def test_remote_config_and_flags_turn_everything_off(client):
    config = await (await client.get("/array/pk_x/config")).json()
    assert config["supportedCompression"] == ["gzip", "gzip-js"] and config["hasFeatureFlags"] is False
    assert config["autocapture_opt_out"] is False and config["sessionRecording"] is False
    response = await client.get("/array/pk_x/config.js")
    assert response.status == 200 and response.content_type == "application/javascript"
    assert "_POSTHOG_REMOTE_CONFIG" in await response.text()
    for method, path in (("POST", "/flags/?v=2"), ("GET", "/flags")):
        response = await client.request(method, path, data="data=e30=")
        assert await response.json() == {"flags": {}, "errorsWhileComputingFlags": False}
    decided = await (await client.post("/decide/?v=4")).json()
    assert decided["flags"] == {} and decided["supportedCompression"] == ["gzip", "gzip-js"]
    assert (await (await client.post("/decide/?v=3")).json())["featureFlags"] == {}


# -- the real clients against `pulse serve` ------------------------------------------------------------


@pytest.fixture
async def served(tmp_path):
    async with serving(tmp_path / "data", "shop") as found:
        yield found


async def read(server: Server, project: dict, endpoint: str) -> dict:
    return await read_api(server, project, endpoint, limit="100")


async def events_once(server: Server, project: dict, expected: int, timeout: float = 30.0) -> int:
    """How many events the project has once `expected` have arrived, and a moment longer, to catch any extra."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (await read(server, project, "overview"))["events"] < expected:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    return (await read(server, project, "overview"))["events"]


def ranked(rows: list[dict]) -> dict:
    return {r["value"]: r["count"] for r in rows}


@pytest.mark.slow
async def test_posthog_python_events_people_and_traits(served):
    from posthog import Posthog

    server, project = served
    errors = []
    signup = str(uuid.uuid4())

    def send() -> None:
        client = Posthog(project["ingest_key"], host=server.url, on_error=lambda e, batch: errors.append(e),
                         flush_interval=0.2)
        client.capture("$pageview", distinct_id="anon-1",
                       properties={"$current_url": "https://shop.example/pricing?utm_source=news"})
        client.capture("$pageview", distinct_id="anon-1", properties={"$current_url": "https://shop.example/docs"})
        client.capture("signup", distinct_id="anon-1", properties={"plan": "pro", "seats": 3}, uuid=signup)
        client.capture("signup", distinct_id="anon-1", properties={"plan": "pro", "seats": 3}, uuid=signup)
        client.alias(previous_id="anon-1", distinct_id="user-1")
        client.set(distinct_id="user-1", properties={"name": "Ada", "plan": "pro"})
        client.set_once(distinct_id="user-1", properties={"first_plan": "free"})
        client.capture("purchase", distinct_id="user-1", properties={"amount": 29.5})
        client.flush()
        client.capture("purchase", distinct_id=42, properties={"amount": 10})
        client.set(distinct_id=42, properties={"name": "Bob"})
        client.shutdown()

    await asyncio.to_thread(send)
    assert errors == []
    # the repeated uuid is stored once: 10 sent, 9 events
    assert await events_once(server, project, 9) == 9
    overview = await read(server, project, "overview")
    # posthog-python sends no $session_id: each person's events, all within 30 minutes, are one session
    assert (overview["events"], overview["unique_users"], overview["sessions"]) == (9, 2, 2)
    assert ranked((await read(server, project, "top-events"))["rows"]) == {
        "page_view": 2, "signup": 1, "$create_alias": 1, "$set": 2, "purchase": 2, "$set_once": 1}
    assert ranked((await read(server, project, "pages"))["rows"]) == {"/pricing": 1, "/docs": 1}
    users = {u["distinct_id"]: u for u in (await read(server, project, "users"))["rows"]}
    assert {k: (u["traits"], u["window_events"]) for k, u in users.items()} == {
        "user-1": ({"name": "Ada", "plan": "pro", "first_plan": "free"}, 7),  # the anonymous events joined
        "42": ({"name": "Bob"}, 2),
    }


PAGE = """<!doctype html><html><head><title>Shop</title><script src="/posthog.js"></script></head><body>
<h1>Shop</h1><script>
// opt_out_useragent_filter: posthog-js drops the events of a headless browser otherwise
posthog.init(%(key)s, {api_host: %(api)s, capture_pageleave: false, autocapture: false,
                        opt_out_useragent_filter: true});
</script></body></html>"""


@pytest.mark.slow
async def test_posthog_js_in_chromium(served):
    server, project = served

    async def page_html(request: web.Request) -> web.Response:
        html = PAGE % {"key": json.dumps(project["ingest_key"]), "api": json.dumps(server.url)}
        return web.Response(text=html, content_type="text/html")

    async def script(request: web.Request) -> web.FileResponse:
        return web.FileResponse(POSTHOG_JS)

    async def no_icon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    site = web.Application()
    site.router.add_get("/shop/", page_html)
    site.router.add_get("/posthog.js", script)
    site.router.add_get("/favicon.ico", no_icon)
    runner = web.AppRunner(site, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    problems: list[str] = []
    sent: list[bytes] = []  # the capture bodies
    async with chromium() as browser:
        try:
            page = await browser.new_page()
            page.on("console", lambda msg: msg.type in ("error", "warning") and problems.append(msg.text))
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
            page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status}: {r.url}"))
            page.on("request", lambda r: r.url.startswith(f"{server.url}/e/") and sent.append(r.post_data_buffer))
            await page.goto(f"http://127.0.0.1:{port}/shop/")
            await page.wait_for_function("window.posthog && window.posthog.__loaded")
            await page.evaluate("posthog.capture('add_to_cart', {sku: 'A-1', price: 12.5})")
            await page.evaluate("posthog.identify('user-7', {plan: 'pro'})")
            await page.evaluate("posthog.capture('checkout', {items: 1})")
            assert await events_once(server, project, 4) == 4
        finally:
            await runner.cleanup()
    assert problems == []
    assert sent and all(body[:2] == b"\x1f\x8b" for body in sent)  # gzip, told by its magic bytes alone
    overview = await read(server, project, "overview")
    assert (overview["events"], overview["unique_users"], overview["sessions"]) == (4, 1, 1)
    assert ranked((await read(server, project, "top-events"))["rows"]) == {
        "page_view": 1, "add_to_cart": 1, "$identify": 1, "checkout": 1}
    assert ranked((await read(server, project, "pages"))["rows"]) == {"/shop/": 1}
    [user] = (await read(server, project, "users"))["rows"]
    assert (user["distinct_id"], user["window_events"]) == ("user-7", 4)
    traits = user["traits"]
    assert traits["plan"] == "pro"
    assert all(key.startswith("$") for key in traits if key != "plan")  # posthog-js's initial person properties
    events = (await read(server, project, "events"))["rows"]
    cart = next(e for e in events if e["event"] == "add_to_cart")
    assert (cart["properties"]["sku"], cart["properties"]["price"]) == ("A-1", 12.5)
    assert {e["browser"] for e in events} == {"HeadlessChrome"}
