"""Umami's send API (`POST /api/send`, `POST /api/batch`) against the real app, and Umami's Node client against a
real `pulse serve`; what was sent is counted back through the read API."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from pulse.server.dropin import umami
from pulse.storage.sqlite.projects import get_project
from pulse.storage.sqlite.schema import MIGRATIONS, _site_ids, migrate
from tests.conftest import counts, read
from tests.servers import read_api, serving

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "node_modules" / "@umami" / "node" / "dist" / "index.mjs"
SEND = "/api/send"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
CRAWLER = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.fixture
def site_id(db, project) -> str:
    return get_project(db, project.id).site_id


async def send(client, payload: dict, kind: str = "event", agent: str = BROWSER, cache: str | None = None):
    headers = {"User-Agent": agent, **({"x-umami-cache": cache} if cache else {})}
    return await client.post(SEND, json={"type": kind, "payload": payload}, headers=headers)


async def test_page_views_events_and_identify_are_counted(client, project, site_id):
    sent = [
        {"website": site_id, "hostname": "site.example", "url": "/", "referrer": "https://news.example/",
         "title": "Home", "screen": "1920x1080", "language": "en-US"},
        {"website": site_id, "hostname": "site.example", "url": "/pricing?utm_source=mail"},
        {"website": site_id, "url": "https://site.example/docs"},
        {"website": site_id, "hostname": "site.example", "url": "/pricing", "name": "signup",
         "data": {"plan": "pro", "seats": 3, "billing": {"yearly": True}, "tags": ["a", "b"]}},
        {"website": site_id, "name": "signup", "data": {"plan": "team"}, "id": "user_7"},
    ]
    for payload in sent:
        response = await send(client, payload)
        assert response.status == 200, await response.text()
        answer = await response.json()
        assert set(answer) == {"cache", "sessionId", "visitId"}
        assert uuid.UUID(answer["sessionId"]) and uuid.UUID(answer["visitId"])
    identify = {"website": site_id, "id": "user_7", "data": {"plan": "team", "age_group": "18-40"}}
    response = await send(client, identify, kind="identify")
    assert response.status == 200

    assert (await read(client, project, "overview"))["events"] == 6
    assert await counts(client, project, "top-events") == {"page_view": 3, "signup": 2, "$identify": 1}
    assert await counts(client, project, "pages") == {"/": 1, "/pricing": 1, "/docs": 1}
    rows = (await read(client, project, "events"))["rows"]
    assert sorted(r["page_url"] for r in rows if r["event"] == "page_view") == [
        "https://site.example/", "https://site.example/docs", "https://site.example/pricing?utm_source=mail"]
    assert [r["referrer"] for r in rows if r["referrer"]] == ["https://news.example/"]
    signups = sorted((r["properties"] for r in rows if r["event"] == "signup"), key=lambda p: p["plan"])
    assert signups == [{"plan": "pro", "seats": 3, "billing.yearly": True, "tags": '["a","b"]'}, {"plan": "team"}]
    with_id = [r for r in rows if r["event"] == "$identify" or (r["properties"] or {}).get("plan") == "team"]
    assert [r["distinct_id"] for r in with_id] == ["user_7", "user_7"]
    users = (await read(client, project, "users"))["rows"]
    assert [(u["distinct_id"], u["traits"], u["events"]) for u in users] == [
        ("user_7", {"plan": "team", "age_group": "18-40"}, 2)]


async def test_timestamp_in_seconds(client, project, site_id, db):
    when = 1_790_000_000  # seconds
    response = await send(client, {"website": site_id, "url": "/", "timestamp": when})
    assert response.status == 200
    assert db.execute("SELECT ts FROM events").fetchone()[0] == when * 1000


async def test_unknown_or_malformed_website_is_400_in_umamis_shape(client, db):
    response = await send(client, {"website": str(uuid.uuid4()), "url": "/"})
    assert response.status == 400
    assert await response.json() == {"error": {"message": "Website not found.", "code": "bad-request", "status": 400}}
    for body in ({"type": "event", "payload": {"website": "not-a-uuid"}}, {"type": "event"}, [1],
                 {"type": "nonsense", "payload": {"website": str(uuid.uuid4())}}):
        response = await client.post(SEND, json=body)
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad-request"
    response = await client.post(SEND, data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0


async def test_bad_fields_are_400(client, site_id, db):
    for payload in ({"website": site_id, "name": "x" * 51}, {"website": site_id, "data": [1]},
                    {"website": site_id, "timestamp": "yesterday"}, {"website": site_id, "screen": "1" * 12}):
        response = await send(client, payload)
        assert response.status == 400, payload
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0


async def test_crawler_gets_beep_boop_and_is_not_stored(client, site_id, db):
    response = await send(client, {"website": site_id, "url": "/"}, agent=CRAWLER)
    assert (response.status, await response.json()) == (200, {"beep": "boop"})
    response = await send(client, {"website": site_id, "url": "/", "userAgent": CRAWLER})
    assert (response.status, await response.json()) == (200, {"beep": "boop"})
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0


async def test_cache_is_kept_only_when_it_verifies(client, site_id):
    first = await (await send(client, {"website": site_id, "url": "/"})).json()
    # the server's own token: the visit it names goes on
    again = await (await send(client, {"website": site_id, "url": "/a"}, cache=first["cache"])).json()
    assert (again["sessionId"], again["visitId"]) == (first["sessionId"], first["visitId"])
    assert umami.verify(again["cache"]) is not None

    claimed = umami.Token(site_id, first["sessionId"], str(uuid.uuid4()), umami.verify(first["cache"]).iat)
    signed = umami.sign(claimed)
    honoured = await (await send(client, {"website": site_id, "url": "/b"}, cache=signed)).json()
    assert honoured["visitId"] == claimed.visit_id  # a token this server signed is used

    payload, signature = signed.split(".")
    other = umami.sign(umami.Token(site_id, first["sessionId"], str(uuid.uuid4()), claimed.iat)).split(".")[0]
    for tampered in (f"{other}.{signature}", f"{payload}.{signature[:-2]}AA", f"{payload}.", "garbage", payload, "é.é"):
        answer = await (await send(client, {"website": site_id, "url": "/c"}, cache=tampered)).json()
        assert answer["visitId"] == first["visitId"], tampered  # as if no cache had been sent
        assert umami.verify(answer["cache"]) is not None


async def test_batch_answers_each_item_and_stores_the_valid_ones(client, project, site_id):
    items = [
        {"type": "event", "payload": {"website": site_id, "hostname": "site.example", "url": "/"}},
        {"type": "event", "payload": {"website": str(uuid.uuid4()), "url": "/"}},
        {"type": "event", "payload": {"website": site_id, "name": "click", "data": {"button": "buy"}}},
        {"type": "identify", "payload": {"website": site_id, "id": "user_9", "data": {"plan": "pro"}}},
        {"type": "event", "payload": {"website": site_id, "name": "x" * 51}},
    ]
    response = await client.post("/api/batch", json=items, headers={"User-Agent": BROWSER})
    assert response.status == 200
    answer = await response.json()
    assert {k: answer[k] for k in ("size", "processed", "errors")} == {"size": 5, "processed": 3, "errors": 2}
    assert answer["details"] == [
        {"index": 1, "response": {"error": {"message": "Website not found.", "code": "bad-request", "status": 400}}},
        {"index": 4, "response": {"error": {"message": "Bad request", "code": "bad-request", "status": 400}}}]
    assert umami.verify(answer["cache"]) is not None
    assert await counts(client, project, "top-events") == {"page_view": 1, "click": 1, "$identify": 1}
    users = (await read(client, project, "users"))["rows"]
    assert [(u["distinct_id"], u["traits"]) for u in users] == [("user_9", {"plan": "pro"})]
    response = await client.post("/api/batch", json={"type": "event"})
    assert response.status == 400


async def test_preflight_allows_the_cache_header(client):
    response = await client.options(SEND, headers={"Origin": "https://site.example",
                                                   "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "content-type,x-umami-cache"})
    assert response.status == 204
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "x-umami-cache"} <= allowed


def test_every_project_has_a_site_id_and_existing_ones_get_theirs(db, make_project):
    made = [make_project(name) for name in ("a", "b")]
    ids = [get_project(db, p.id).site_id for p in made]
    assert all(uuid.UUID(found) for found in ids) and len(set(ids)) == 2
    # back to the schema before site ids: the migration gives each project one
    db.execute("DROP INDEX projects_site_id")
    db.execute("ALTER TABLE projects DROP COLUMN site_id")
    db.execute(f"PRAGMA user_version = {MIGRATIONS.index(_site_ids)}")  # later migrations run again after it
    migrate(db)
    again = [get_project(db, p.id).site_id for p in made]
    assert all(uuid.UUID(found) for found in again) and len(set(again)) == 2
    with pytest.raises(Exception, match="UNIQUE"):
        db.execute("UPDATE projects SET site_id = ? WHERE id = ?", (again[0], made[1].id))


# -- @umami/node from node, against `pulse serve` -------------------------------------------------------------

SCRIPT = """
import umami from %(client)s;
umami.init({websiteId: %(site)s, hostUrl: %(host)s});
const answers = [];
const check = async (sent) => { const r = await sent; answers.push([r.status, await r.json()]); };
await check(umami.track({url: "/", hostname: "site.example", title: "Home"}));
await check(umami.track({url: "/pricing", hostname: "site.example", referrer: "https://news.example/"}));
await check(umami.track({url: "/pricing", hostname: "site.example"}));
await check(umami.track("signup", {plan: "pro", seats: 3}));
await check(umami.track("signup", {plan: "team"}));
await check(umami.identify({plan: "team", age_group: "18-40"}));
await check(umami.track({name: "purchase", data: {amount: 29}, id: "user_42"}));
console.log(JSON.stringify(answers));
"""


@pytest.fixture
async def served(tmp_path):
    async with serving(tmp_path / "data", "site", "--domain", "site.example") as found:
        yield found


@pytest.mark.slow
async def test_umami_node_client_counts_exactly(served, tmp_path):
    server, project = served
    assert CLIENT.exists(), "npm install puts @umami/node in node_modules"
    script = tmp_path / "send.mjs"
    script.write_text(SCRIPT % {"client": json.dumps(CLIENT.as_uri()), "site": json.dumps(project["site_id"]),
                                "host": json.dumps(server.url)})
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert [status for status, _ in answers] == [200] * 7
    assert all(set(body) == {"cache", "sessionId", "visitId"} for _, body in answers)
    # one machine, one user agent: one Umami session for all but the event with an id
    assert len({body["sessionId"] for _, body in answers[:6]}) == 1
    assert answers[6][1]["sessionId"] != answers[0][1]["sessionId"]

    # every request was answered after its commit: the reads see all of them now
    overview = await read_api(server, project, "overview", limit="100")
    assert (overview["events"], overview["unique_users"]) == (7, 2)
    top = {row["value"]: row["count"] for row in (await read_api(server, project, "top-events", limit="100"))["rows"]}
    assert top == {"page_view": 3, "signup": 2, "$identify": 1, "purchase": 1}
    pages = {row["value"]: row["count"] for row in (await read_api(server, project, "pages", limit="100"))["rows"]}
    assert pages == {"/": 1, "/pricing": 2}
    rows = (await read_api(server, project, "events", limit="100"))["rows"]
    assert sorted(json.dumps(r["properties"], sort_keys=True) for r in rows if r["event"] == "signup") == [
        '{"plan": "pro", "seats": 3}', '{"plan": "team"}']
    assert [r["distinct_id"] for r in rows if r["event"] == "purchase"] == ["user_42"]
    # identify without an id gives its traits to the anonymous visitor (the IP and user agent's daily hash),
    # who is then listed among the users with them
    anonymous = {r["distinct_id"] for r in rows if r["event"] != "purchase"}
    assert len(anonymous) == 1 and next(iter(anonymous)).startswith("$ip:")
    users = (await read_api(server, project, "users", limit="100"))["rows"]
    assert [(u["distinct_id"], u["traits"], u["events"]) for u in users] == [
        (next(iter(anonymous)), {"plan": "team", "age_group": "18-40"}, 6)]
