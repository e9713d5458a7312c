"""Plausible's Events API (`POST /api/event`) against the real app, and Plausible's npm tracker in headless
Chromium against a real `pulse serve`; what was sent is counted back through the read API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web

from pulse.config import Settings
from pulse.server.app import create_app
from tests.conftest import counts, read
from tests.servers import Server, chromium, free_port, read_api, serving

ROOT = Path(__file__).resolve().parents[2]
TRACKER = ROOT / "node_modules" / "@plausible-analytics" / "tracker" / "plausible.js"
EVENT = "/api/event"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
CRAWLER = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.fixture
def other(make_project):
    return make_project("other", domain="other.example")


@pytest.fixture
async def client(aiohttp_client, settings: Settings, project, other):
    """The real app, started once both projects (site.example and other.example) exist."""
    return await aiohttp_client(create_app(settings))


async def send(client, body, content_type: str = "text/plain", agent: str = BROWSER):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return await client.post(EVENT, data=data, headers={"Content-Type": content_type, "User-Agent": agent})


async def test_short_and_long_keys_props_as_object_or_json_text(client, project):
    sent = [
        ({"n": "pageview", "u": "https://site.example/", "d": "site.example", "r": "https://news.example/a"},
         "text/plain"),
        ({"name": "pageview", "url": "https://site.example/pricing", "domain": "site.example"}, "application/json"),
        ({"n": "Signup", "u": "https://site.example/pricing", "d": "site.example", "p": '{"plan": "pro"}'},
         "text/plain"),
        ({"name": "Signup", "url": "https://site.example/pricing", "domain": "site.example",
          "props": {"plan": "team", "seats": 3, "tags": ["dropped"]}, "interactive": False}, "application/json"),
        ({"n": "Download", "u": "https://site.example/", "d": "site.example", "m": {"file": "a.pdf"}, "i": True},
         "text/plain"),
    ]
    for body, content_type in sent:
        response = await send(client, body, content_type)
        assert response.status == 202
        assert await response.text() == "ok"
        assert response.headers["Content-Type"].startswith("text/plain")
        assert "x-plausible-dropped" not in response.headers
        assert response.headers["Access-Control-Allow-Origin"] == "*"

    assert (await read(client, project, "overview"))["events"] == 5
    assert await counts(client, project, "top-events") == {"page_view": 2, "Signup": 2, "Download": 1}
    assert await counts(client, project, "pages") == {"/": 1, "/pricing": 1}
    rows = (await read(client, project, "events"))["rows"]
    assert [r["referrer"] for r in rows if r["referrer"]] == ["https://news.example/a"]
    assert sorted(json.dumps(r["properties"], sort_keys=True) for r in rows if r["event"] != "page_view") == [
        '{"file": "a.pdf"}', '{"plan": "pro"}', '{"plan": "team", "seats": 3}']


async def test_hash_mode_path_holds_the_fragment(client, project):
    for body in ({"n": "pageview", "u": "https://site.example/app#/settings", "d": "site.example", "h": 1},
                 {"name": "pageview", "url": "https://site.example/app#/billing", "domain": "site.example",
                  "hashMode": 1},
                 {"n": "pageview", "u": "https://site.example/app#top", "d": "site.example"}):
        assert (await send(client, body)).status == 202
    assert await counts(client, project, "pages") == {"/app#/settings": 1, "/app#/billing": 1, "/app": 1}


async def test_a_list_of_domains_records_the_event_in_each_known_project(client, project, other):
    response = await send(client, {"n": "pageview", "u": "https://site.example/", "d": "site.example,other.example"})
    assert response.status == 202 and "x-plausible-dropped" not in response.headers
    response = await send(client, {"n": "pageview", "u": "https://site.example/",
                                   "d": "Site.Example, unknown.example"})
    assert (response.status, await response.text()) == (202, "ok")
    assert response.headers["x-plausible-dropped"] == "1"
    assert (await read(client, project, "overview"))["events"] == 2
    assert (await read(client, other, "overview"))["events"] == 1


async def test_domain_taken_from_the_url_when_absent(client, project):
    assert (await send(client, {"n": "pageview", "u": "https://www.site.example/x"})).status == 202
    assert await counts(client, project, "pages") == {"/x": 1}


async def test_unknown_domain_and_crawler_are_answered_dropped_with_202(client, project, db):
    response = await send(client, {"n": "pageview", "u": "https://nowhere.example/", "d": "nowhere.example"})
    assert (response.status, await response.text(), response.headers["x-plausible-dropped"]) == (202, "ok", "1")
    response = await send(client, {"n": "pageview", "u": "https://site.example/", "d": "site.example"},
                          agent=CRAWLER)
    assert (response.status, await response.text(), response.headers["x-plausible-dropped"]) == (202, "ok", "1")
    # the unknown domain's event is not stored; the crawler's is, as a bot's (which reads leave out)
    assert db.execute("SELECT count(*), sum(a.is_bot) FROM events e JOIN agents a ON a.id = e.agent_id"
                      ).fetchone() == (1, 1)


async def test_engagement_is_accepted_and_not_counted(client, project, db):
    response = await send(client, {"n": "engagement", "u": "https://site.example/", "d": "site.example",
                                   "sd": 40, "e": 1200, "v": 36})
    assert (response.status, await response.text()) == (202, "ok")
    response = await send(client, {"n": "engagement", "u": "https://site.example/", "d": "site.example"})
    assert response.status == 400
    assert list((await response.json())["errors"]) == ["event_name"]
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0


@pytest.mark.parametrize(("body", "errors"), [
    ("{not json", {"request": ["Unable to parse request body as json"]}),
    ("[1, 2]", {"request": ["Unable to parse request body as json"]}),
    ({"n": "pageview", "d": "site.example"}, {"url": ["is required"]}),
    ({"u": "https://site.example/", "d": "site.example"}, {"event_name": ["can't be blank"]}),
    ({"n": "pageview", "u": "https://site.example/", "d": ""}, {"domain": ["can't be blank"]}),
    ({"n": "x" * 121, "u": "https://site.example/", "d": "site.example"},
     {"event_name": ["should be at most 120 character(s)"]}),
    ({"n": "pageview", "u": "https://site.example/", "d": "site.example", "p": "[1]"}, {"props": ["is invalid"]}),
    ({"n": "pageview", "u": "https://site.example/", "d": "site.example", "p": "{bad"}, {"props": ["is invalid"]}),
])
async def test_bad_body_is_400_in_plausibles_shape(client, db, body, errors):
    response = await send(client, body)
    assert response.status == 400
    assert response.headers["Content-Type"].startswith("application/json")
    assert await response.json() == {"errors": errors}
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0


# -- @plausible-analytics/tracker in Chromium, against `pulse serve` ----------------------------------------

PAGE = """<!doctype html>
<html><head><title>shop</title></head><body>
<button id="signup">Sign up</button>
<script type="module">
import { init, track } from "/plausible.js";
init({domain: "site.example", endpoint: "%(endpoint)s", captureOnLocalhost: true, autoCapturePageviews: true});
document.getElementById("signup").addEventListener("click", () => {
  track("Signup", {props: {plan: "pro"}, callback: (result) => { window.signupStatus = result.status; }});
});
window.ready = true;
</script>
</body></html>
"""


@pytest.fixture
async def served(tmp_path):
    async with serving(tmp_path / "data", "site", "--domain", "site.example") as found:
        yield found


@pytest.fixture
async def site(served):
    """The shop's pages on loopback: the page, and Plausible's tracker module as the npm package has it."""
    server, _ = served
    assert TRACKER.exists(), "npm install puts @plausible-analytics/tracker in node_modules"
    page = PAGE % {"endpoint": server.url + EVENT}

    async def html(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def module(_: web.Request) -> web.Response:  # the package is one self-contained ES module
        return web.Response(body=TRACKER.read_bytes(), content_type="text/javascript")

    app = web.Application()
    app.router.add_get("/plausible.js", module)
    app.router.add_get("/{tail:.*}", html)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def browser():
    async with chromium() as found:
        yield found


async def settled_events(server: Server, project: dict, expected: int, timeout: float = 15.0) -> int:
    """The project's event count once `expected` have arrived, and a moment longer, to catch any extra."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (await read_api(server, project, "overview", limit="100"))["events"] < expected:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    return (await read_api(server, project, "overview", limit="100"))["events"]


@pytest.mark.slow
async def test_plausible_tracker_in_chromium_counts_exactly(served, site, browser):
    server, project = served
    page = await browser.new_page()
    problems: list[str] = []
    page.on("console", lambda message: message.type in ("error", "warning") and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("requestfailed", lambda request: problems.append(f"{request.url}: {request.failure}"))
    answers: list[int] = []
    page.on("response", lambda response: response.url.endswith(EVENT) and answers.append(response.status))

    await page.goto(f"{site}/")
    await page.wait_for_function("window.ready === true")
    await page.evaluate("history.pushState({}, '', '/pricing')")  # an SPA navigation: a second page view
    await page.click("#signup")
    await page.wait_for_function("window.signupStatus !== undefined")
    assert await page.evaluate("window.signupStatus") == 202

    # the engagement event sent when the page goes away is answered and not counted
    assert await settled_events(server, project, 3) == 3
    top = {row["value"]: row["count"] for row in (await read_api(server, project, "top-events", limit="100"))["rows"]}
    assert top == {"page_view": 2, "Signup": 1}
    pages = {row["value"]: row["count"] for row in (await read_api(server, project, "pages", limit="100"))["rows"]}
    assert pages == {"/": 1, "/pricing": 1}
    rows = (await read_api(server, project, "events", limit="100"))["rows"]
    assert [r["properties"] for r in rows if r["event"] == "Signup"] == [{"plan": "pro"}]
    assert {r["browser"] for r in rows} == {"HeadlessChrome"}
    await page.close()
    assert answers and set(answers) == {202}
    assert problems == []
