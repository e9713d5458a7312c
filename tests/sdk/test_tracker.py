"""The browser tracker in headless Chromium against a real `pulse serve`, checked through the read API."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pulse.enrich import screen_class
from tests.servers import Server, chromium, free_port, read_api, serving

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 1536  # bytes, minified + gzip
pytestmark = pytest.mark.slow


@pytest.fixture
async def served(tmp_path):
    async with serving(tmp_path / "data", "site") as found:
        yield found


@pytest.fixture
async def browser():
    async with chromium() as found:
        yield found


read = read_api


async def stored_events(server: Server, project: dict, expected: int, timeout: float = 15.0) -> list[dict]:
    """The project's events once `expected` have arrived, and a moment longer, to catch any extra."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = (await read(server, project, "events", limit="100"))["rows"]
        if len(rows) >= expected or asyncio.get_running_loop().time() > deadline:
            await asyncio.sleep(1.0)
            return (await read(server, project, "events", limit="100"))["rows"]
        await asyncio.sleep(0.2)


async def open_demo(browser, url: str):
    page = await browser.new_page()
    await page.goto(url)
    await page.wait_for_function("window.pulse && window.pulse.flush && !window.pulse.q")
    return page


async def test_demo_page_events_arrive_once_each_in_one_session_with_identify(served, browser):
    server, project = served
    page = await open_demo(browser, f"{server.url}/demo/?key={project['ingest_key']}")
    for button in ("#click", "#signup", "#purchase", "#navigate"):
        await page.click(button)
    await page.fill("#user", "user_42")
    await page.select_option("#gender", "Female")
    await page.click("#identify button")
    await page.goto("about:blank")  # the page goes away: the last events leave by sendBeacon

    rows = await stored_events(server, project, 6)
    assert sorted(r["event"] for r in rows) == sorted(
        ["page_view", "click", "signup", "purchase", "page_view", "$identify"])
    assert len({r["uuid"] for r in rows}) == 6
    by_name = {r["event"]: r for r in rows}
    assert sorted(r["path"] for r in rows if r["event"] == "page_view") == ["/demo/", "/demo/pricing"]
    assert by_name["click"]["properties"]["button"] == "demo"
    assert by_name["signup"]["properties"]["plan"] == "pro"
    assert {k: by_name["purchase"]["properties"][k] for k in ("amount", "currency")} == {"amount": 29, "currency": "EUR"}
    sent = by_name["click"]["properties"]
    assert sent["$timezone"]
    # the screen's width and the browser's language go as fields of their own, kept as a class and a base language
    screens = await read(server, project, "screens")
    assert [(r["value"], r["count"]) for r in screens["rows"]] == [(screen_class(await page.evaluate("screen.width")), 6)]
    languages = await read(server, project, "languages")
    language = (await page.evaluate("navigator.language")).split("-")[0].lower()
    assert [(r["value"], r["count"]) for r in languages["rows"]] == [(language, 6)]
    assert {r["distinct_id"] for r in rows} == {"user_42"}  # the anonymous events joined the identified person
    assert {r["browser"] for r in rows} == {"HeadlessChrome"}

    overview = await read(server, project, "overview")
    assert (overview["events"], overview["unique_users"], overview["sessions"]) == (6, 1, 1)
    users = (await read(server, project, "users"))["rows"]
    assert [(u["distinct_id"], u["traits"], u["window_events"]) for u in users] == [
        ("user_42", {"age_group": "18-40", "gender": "Female"}, 6)]


async def test_retries_deliver_each_event_exactly_once(served, browser):
    server, project = served
    posts = []

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "POST":
            posts.append(request.path)
            if len(posts) <= 2:  # the first two attempts fail
                return web.Response(status=503, headers={"Retry-After": "1", "Access-Control-Allow-Origin": "*"})
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, f"{server.url}{request.path_qs}", data=body,
                                       headers={"Content-Type": request.headers.get("Content-Type", "text/plain")}
                                       ) as upstream:
                return web.Response(status=upstream.status, body=await upstream.read(),
                                    headers={"Content-Type": upstream.headers["Content-Type"],
                                             "Access-Control-Allow-Origin": "*"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        page = await open_demo(browser, f"http://127.0.0.1:{port}/demo/?key={project['ingest_key']}")
        await page.click("#click")
        await page.click("#flush")
        rows = await stored_events(server, project, 2)
        assert sorted(r["event"] for r in rows) == ["click", "page_view"]
        assert len(posts) == 3  # two refused, the third delivered
    finally:
        await runner.cleanup()


def test_tracker_size_budget():
    size = len(gzip.compress((ROOT / "sdk" / "tracker.min.js").read_bytes(), 9))
    print(f"\ntracker.min.js: {size} bytes minified + gzip (budget {BUDGET})")
    assert size <= BUDGET


def test_minified_tracker_is_built_from_the_source(tmp_path):
    terser = ROOT / "node_modules" / ".bin" / "terser"
    if not terser.exists():
        pytest.skip("terser is not installed (npm install; scripts/test does)")
    built = tmp_path / "tracker.min.js"
    script = json.loads((ROOT / "package.json").read_text())["scripts"]["build"]
    subprocess.run(script.replace("sdk/tracker.min.js", str(built)).replace("terser", str(terser), 1).split(),
                   cwd=ROOT, check=True)
    assert built.read_bytes() == (ROOT / "sdk" / "tracker.min.js").read_bytes(), "run: npm run build"


async def test_calls_made_before_the_tracker_loads_are_replayed(served, browser):
    server, project = served
    page = await browser.new_page()
    # a site's stub queued this before the tracker arrived
    await page.add_init_script("window.pulse = {q: [['event', 'early', {when: 'before load'}]]};")
    await page.goto(f"{server.url}/demo/?key={project['ingest_key']}")
    await page.wait_for_function("window.pulse && window.pulse.flush && !window.pulse.q")
    await page.evaluate("pulse.flush()")
    rows = await stored_events(server, project, 2)
    assert sorted(r["event"] for r in rows) == ["early", "page_view"]
    assert next(r for r in rows if r["event"] == "early")["properties"]["when"] == "before load"
