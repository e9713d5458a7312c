"""The web dashboard in headless Chromium against a real `pulse serve`: its numbers are the read API's, a share
link shows it and reads nothing else, revoking the link closes the open page's feed and refuses the next load,
hostile values stay text, and screenshots at desktop and phone widths."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from PIL import Image, ImageChops
from syrupy.extensions.image import PNGImageSnapshotExtension

from tests.servers import chromium, pulse, serving
from tests.web.data import fixed_events, ingest

pytestmark = pytest.mark.slow

WEEK = {"from": "2025-03-10", "to": "2025-03-16"}
DAY = {"from": "2025-03-12", "to": "2025-03-12", "interval": "hour"}
CARD_FIELDS = ("events", "unique_users", "sessions", "bounce_rate", "avg_session_seconds", "pages_per_session",
               "daily_average")
# what the page shows of a name: control and bidirectional formatting characters as visible marks
INVISIBLE = {*range(0x00, 0x20), *range(0x7F, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
SETTLE_TRIES = 10
HOSTILE = ("<script>window.pwned=1</script>", '"onerror="window.pwned=2', "<img src=x onerror=window.pwned=3>",
           "\u202eevil\u202c name", "bell\u0007and\u0000nul")


async def read_api(server, project: dict, endpoint: str, **params: str) -> dict:
    """A read-API answer for exactly these parameters, with the project's read token."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/api/v1/projects/{project['id']}/{endpoint}", params=params,
                               headers={"Authorization": f"Bearer {project['read_token']}"}) as response:
            assert response.status == 200, await response.text()
            return await response.json()


def shown(name: str) -> str:
    return "".join(f"\u27e8U+{ord(c):04X}\u27e9" if ord(c) in INVISIBLE else c for c in name)


@pytest.fixture
async def served(tmp_path):
    async with serving(tmp_path / "data", "site") as (server, project):
        await ingest(server.url, project["ingest_key"], fixed_events())
        yield server, project


@pytest.fixture
async def browser():
    async with chromium() as found:
        yield found


def query(params: dict) -> str:
    return "&".join(f"{k}={v}" for k, v in params.items())


async def open_board(browser, server, project, params: dict, *, token: str | None = None, page=None,
                     viewport=(1280, 800)):
    """The dashboard of `params`, after entering the read token in its form the first time."""
    if page is None:
        context = await browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                            color_scheme="light", timezone_id="UTC", locale="en-US")
        page = await context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    await page.goto(f"{server.url}/dashboard/{project['id']}?{query(params)}")
    if token is not None:
        await page.fill("#token", token)
        await page.click("#login button")
    await page.wait_for_selector("body[data-state=ready]", timeout=20_000)
    return page


async def page_numbers(page) -> dict:
    return await page.evaluate("""() => ({
      cards: Object.fromEntries([...document.querySelectorAll('#cards [data-card] .value')]
        .map(e => [e.closest('[data-card]').dataset.card, e.dataset.value])),
      buckets: [...document.querySelectorAll('#chart rect[data-start]')]
        .map(r => [r.dataset.start, +r.dataset.events, +r.dataset.previous]),
      top: [...document.querySelectorAll('#top li[data-value]')].map(li => [li.dataset.value, +li.dataset.count, +li.dataset.users]),
      breakdown: [...document.querySelectorAll('#breakdown tbody tr[data-value]')]
        .map(tr => [tr.dataset.value, +tr.dataset.count, +tr.dataset.users]),
    })""")


async def api_numbers(server, project, params: dict, breakdown: str) -> dict:
    window = {k: v for k, v in params.items() if k != "interval"}
    overview = await read_api(server, project, "overview", **window)
    series = await read_api(server, project, "timeseries", **window, interval=params.get("interval", "day"))
    top = await read_api(server, project, "top-events", **window)
    rows = await read_api(server, project, breakdown, **window)
    return {
        "cards": {**{f: overview[f] for f in CARD_FIELDS}, "top_event": overview["top_event"]["event"]},
        "buckets": [[b["start"], b["events"], p["events"]] for b, p in zip(series["buckets"], series["previous"])],
        "top": [[r["value"], r["count"], r["unique_users"]] for r in top["rows"]],
        "breakdown": [[r["value"], r["count"], r["unique_users"]] for r in rows["rows"]],
    }


def as_numbers(cards: dict) -> dict:
    return {k: (v if k == "top_event" else float(v)) for k, v in cards.items()}


async def test_the_page_shows_the_read_apis_numbers_for_two_windows_and_a_filter(served, browser):
    server, project = served
    page = await open_board(browser, server, project, WEEK, token=project["read_token"])
    for params, tab, endpoint in ((WEEK, None, "pages"), (DAY, "Browsers", "browsers"),
                                  ({**WEEK, "browser": "Firefox"}, "Referrers", "referrers")):
        page = await open_board(browser, server, project, {**params, **({"tab": tab} if tab else {})}, page=page)
        found, expected = await page_numbers(page), await api_numbers(server, project, params, endpoint)
        assert as_numbers(found["cards"]) == expected["cards"]
        assert found["buckets"] == expected["buckets"] and found["buckets"]
        assert found["top"] == expected["top"] and found["top"]
        assert found["breakdown"] == expected["breakdown"] and found["breakdown"]
    # the week has a previous week of at least 20 events: each card says how it changed
    page = await open_board(browser, server, project, WEEK, page=page)
    assert all(await page.eval_on_selector_all("#cards [data-change]", "els => els.map(e => e.dataset.change !== '')"))
    # a click on a top event filters on it: a chip, and the API's numbers under event=
    await page.click("#top li[data-value=signup] button")
    await page.wait_for_selector("#chips [data-filter=event]")
    await page.wait_for_selector("body[data-state=ready]")
    assert "event=signup" in page.url
    found, expected = await page_numbers(page), await api_numbers(server, project, {**WEEK, "event": "signup"}, "pages")
    assert as_numbers(found["cards"]) == expected["cards"]
    # the chip's × removes it
    await page.click("#chips [data-filter=event]")
    await page.wait_for_function("() => !location.search.includes('event=')")
    assert page.errors == []


async def wait_for(predicate, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _granted(server, project, token: str) -> bool:
    return await status(server, project, "overview", token) == 200


async def status(server, project, endpoint: str, token: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/api/v1/projects/{project['id']}/{endpoint}",
                               headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status != 200:
                assert "error" in await response.json()
            return response.status


async def test_a_share_link_shows_the_dashboard_reads_nothing_else_and_stops_when_revoked(served, browser, tmp_path):
    server, project = served
    made = json.loads(pulse("share", "create", "site", "--public-url", server.url, "--json",
                            data_dir=tmp_path / "data").stdout)
    assert made["url"] == f"{server.url}/dashboard/{project['id']}#share={made['token']}"
    token = made["token"]
    # the server takes in the new token at its next look at the catalog (a quarter of a second)
    await wait_for(lambda: _granted(server, project, token))
    for endpoint in ("overview", "timeseries", "top-events", "pages", "referrers", "utm", "countries", "goals"):
        assert await status(server, project, endpoint, token) == 200, endpoint
    for endpoint in ("events", "users", "users/u1", "sessions", "properties", "traits", "bots"):
        assert await status(server, project, endpoint, token) == 403, endpoint
    assert await status(server, {"id": project["id"] + 1}, "overview", token) == 403

    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    await page.goto(f"{server.url}/dashboard/{project['id']}?from=2025-03-10&to=2025-03-16#share={token}")
    await page.wait_for_selector("body[data-state=ready]")
    assert await page.get_attribute("#cards [data-card=events] .value", "data-value") == str(
        (await read_api(server, project, "overview", **WEEK))["events"])
    assert await page.is_hidden("#login")
    await page.wait_for_selector("#feed-state[data-state=open]")
    # the feed shows a new event's name and path, nothing that tells visitors apart
    await ingest(server.url, project["ingest_key"], [{"event": "live_one", "distinct_id": "secret_user",
                                                      "page_url": "https://site.example/now"}])
    await page.wait_for_selector("#feed li")
    assert "live_one" in await page.text_content("#feed") and "secret_user" not in await page.content()

    pulse("share", "revoke", "site", made["prefix"], data_dir=tmp_path / "data")
    await page.wait_for_selector("#feed[data-closed=revoked]", state="attached", timeout=15_000)
    await page.wait_for_selector("#error:not([hidden])")
    assert "revoked" in await page.text_content("#error")
    assert await status(server, project, "overview", token) == 401
    await page.reload()
    await page.wait_for_selector("body[data-state=failed]")
    assert "revoked or has expired" in await page.text_content("#error")
    assert await page.is_hidden("#board")


async def test_hostile_names_render_as_text_and_run_nothing(served, browser):
    server, project = served
    await ingest(server.url, project["ingest_key"], [
        {"event": name, "distinct_id": "h", "timestamp": "2025-03-12T12:00:00Z",
         "page_url": "https://site.example/" + name.replace("\u0000", "").replace("\u0007", "")}
        for name in HOSTILE])
    page = await open_board(browser, server, project, {**WEEK, "tab": "Pages"}, token=project["read_token"])
    top = dict(await page.eval_on_selector_all("#top li[data-value]",
                                               "els => els.map(li => [li.dataset.value, li.textContent])"))
    for name in HOSTILE:
        assert name in top, name
        assert top[name].startswith(shown(name)), (name, top[name])
    assert await page.evaluate("window.pwned") is None
    assert await page.evaluate("document.querySelectorAll('#board script, #board img').length") == 0
    # a hostile value as a filter: the chip shows it as text and the URL carries it
    await page.click(f"#top li[data-value='{HOSTILE[0]}'] button")
    await page.wait_for_selector("#chips [data-filter=event]")
    assert await page.text_content("#chips [data-filter=event]") == f"event: {HOSTILE[0]} ×"
    await page.wait_for_selector("body[data-state=ready]")
    assert await page.evaluate("window.pwned") is None
    assert page.errors == []


STRAY_PIXELS = 16


@pytest.fixture
def png(snapshot):
    return snapshot.use_extension(NearlyTheSamePNG)


class NearlyTheSamePNG(PNGImageSnapshotExtension):
    """A screenshot matches its snapshot when at most STRAY_PIXELS pixels differ: on a loaded machine Chromium's
    rasterizer once shaded two pixels of a rounded corner differently, which is no change of the page."""

    def matches(self, *, serialized_data, snapshot_data) -> bool:
        if serialized_data == snapshot_data:
            return True
        if not isinstance(serialized_data, bytes) or not isinstance(snapshot_data, bytes):
            return False
        shot, kept = (Image.open(io.BytesIO(data)).convert("RGB") for data in (serialized_data, snapshot_data))
        if shot.size != kept.size:
            return False
        same = ImageChops.difference(shot, kept).convert("L").histogram()[0]
        return shot.width * shot.height - same <= STRAY_PIXELS


@pytest.mark.parametrize("width, height", [(1280, 800), (360, 740)])
async def test_screenshot(served, browser, png, width, height):
    """A week of the fixed past traffic by custom dates, so nothing on the page depends on the clock: no live
    visitors, and the feed waits for events."""
    server, project = served
    page = await open_board(browser, server, project, WEEK, token=project["read_token"], viewport=(width, height))
    await page.wait_for_selector("#feed-state[data-state=open]")
    await page.wait_for_function("() => document.getElementById('project').textContent === 'site'")
    await page.evaluate("document.fonts.ready")
    await page.mouse.move(0, 0)  # the pointer left over the login button would hover whatever is there now
    # and nothing focused: a busy machine caught the Apply button's edge mid-way through its focus ring
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    # the page as it stays: two screenshots in a row alike (a frame still painting on a busy machine differs)
    shot, before = await page.screenshot(animations='disabled', caret='hide'), None
    for _ in range(SETTLE_TRIES):
        if shot == before:
            break
        await page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        shot, before = await page.screenshot(animations='disabled', caret='hide'), shot
    assert shot == png
