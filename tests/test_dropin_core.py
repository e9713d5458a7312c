"""What drop-in ingest relies on in pulse's own ingest path and writer: sessions for events that name none,
backends that are not bots, client IPs behind trusted proxies, and keys that work as soon as they are made."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import datetime, timezone

from pulse.protocol import IngestEvent
from pulse.storage.model import IngestJob
from pulse.storage.sqlite.rows import prepare
from pulse.storage.sqlite.wire import Submit
from tests.conftest import event

MINUTE = 60_000
HOUR = 60 * MINUTE
GAP = 30 * MINUTE
BASE = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1000)
WINDOW = {"from": "2026-03-01", "to": "2026-03-03"}


# -- sessions for events without a session id -------------------------------------------------------


def split_visits(times_by_visitor: dict[str, list[tuple[int, str | None]]]) -> list[list[tuple[int, str | None]]]:
    """Each visitor's (ts, page path or None) split into visits wherever 30 minutes pass without an event."""
    visits = []
    for events in times_by_visitor.values():
        current: list = []
        for ts, path in sorted(events, key=lambda item: item[0]):
            if current and ts - current[-1][0] > GAP:
                visits.append(current)
                current = []
            current.append((ts, path))
        visits.append(current)
    return visits


def expected_numbers(visits: list[list[tuple[int, str | None]]]) -> dict:
    pages = [[path for _, path in visit if path is not None] for visit in visits]
    count = len(visits)
    return {
        "sessions": count,
        "bounce_rate": round(sum(len(visit) == 1 for visit in visits) / count, 4),
        "avg_session_seconds": round(sum(visit[-1][0] - visit[0][0] for visit in visits) / count / 1000, 1),
        "pages_per_session": round(sum(len(p) for p in pages) / count, 2),
        "entry": Counter(p[0] for p in pages if p),
        "exit": Counter(p[-1] for p in pages if p),
    }


async def read_numbers(client, project) -> dict:
    headers = {"Authorization": f"Bearer {project.read_token}"}
    base = f"/api/v1/projects/{project.id}"
    overview = await (await client.get(f"{base}/overview", params=WINDOW, headers=headers)).json()
    found = {key: overview[key] for key in ("sessions", "bounce_rate", "avg_session_seconds", "pages_per_session")}
    for kind in ("entry", "exit"):
        body = await (await client.get(f"{base}/{kind}-pages", params=WINDOW, headers=headers)).json()
        found[kind] = Counter({row["value"]: row["count"] for row in body["rows"]})
    return found


async def post(client, project, events: list[dict], **headers) -> None:
    response = await client.post("/api/v1/events/ingest", json={"events": events},
                                 headers={"X-API-Key": project.ingest_key, **headers})
    assert response.status == 202, await response.text()


def page(ts: int, path: str, **fields) -> dict:
    return event("page_view", timestamp=ts, page_url=f"https://site.example{path}", **fields)


async def test_events_without_a_session_id_are_split_into_visits_by_their_visitor(client, project):
    """Interleaved visitors (named, anonymous by IP, one identified mid-visit) sent in several batches: the
    sessions, bounce rate, duration, pages per session and entry and exit pages are those of each
    visitor's events split wherever 30 minutes pass without one."""
    rng = random.Random(7)
    start = BASE + 9 * HOUR
    # (visitor, ts offset in minutes, path or None for a non-page event)
    plan = [
        # a visitor who pauses for more than 30 minutes: two visits
        *[("ann", m, p) for m, p in ((0, "/"), (10, "/pricing"), (25, None), (29, "/docs"), (65, "/blog"),
                                     (80, "/"))],
        # exactly 30 minutes apart: one visit; then a single page view 31 minutes later: a bounce
        *[("bob", m, p) for m, p in ((5, "/docs"), (35, "/docs/api"), (66, "/pricing"))],
        # anonymous visitors told apart by their IP (no distinct id): one bounce each
        ("ip:198.51.100.7", 12, "/"), ("ip:198.51.100.8", 13, "/blog"),
        # identified mid-visit: the anonymous id's events and the user's make one visit
        ("anon-cat", 20, "/"), ("anon-cat", 24, "/signup"), ("identify-cat", 26, None), ("cat", 30, "/welcome"),
        ("cat", 45, "/app"),
    ]
    bodies: list[dict] = []
    visitors: dict[str, list[tuple[int, str | None]]] = {}
    for who, minutes, path in plan:
        ts = start + minutes * MINUTE
        fields: dict = {}
        if who.startswith("ip:"):
            fields["ip"] = who[3:]
        elif who == "identify-cat":
            fields.update(distinct_id="cat", anon_id="anon-cat")
        else:
            fields["distinct_id"] = who
        body = page(ts, path, **fields) if path else event("click", timestamp=ts, **fields)
        if who == "identify-cat":
            body["event"] = "$identify"
        bodies.append(body)
        person = "cat" if who in ("anon-cat", "identify-cat") else who
        visitors.setdefault(person, []).append((ts, path))
    bodies.sort(key=lambda body: body["timestamp"])  # visitors interleaved, each in the order of its events
    at = 0
    while at < len(bodies):
        size = rng.randint(1, 4)
        await post(client, project, bodies[at:at + size])
        at += size
    expected = expected_numbers(split_visits(visitors))
    assert expected["sessions"] == 7
    assert await read_numbers(client, project) == expected


async def test_a_late_event_within_the_gap_joins_the_visit_and_one_later_starts_another(client, project):
    """An event that arrives after later ones of its visit, but within 30 minutes of them, is in the visit;
    one more than 30 minutes after the last event starts a new visit."""
    start = BASE + 14 * HOUR
    await post(client, project, [page(start + 20 * MINUTE, "/b", distinct_id="dan")])
    await post(client, project, [page(start, "/a", distinct_id="dan")])  # late, 20 minutes before
    await post(client, project, [page(start + 51 * MINUTE, "/c", distinct_id="dan")])  # 31 after the last
    expected = expected_numbers(split_visits({"dan": [(start, "/a"), (start + 20 * MINUTE, "/b"),
                                                      (start + 51 * MINUTE, "/c")]}))
    assert expected["sessions"] == 2
    assert await read_numbers(client, project) == expected


def _submit(project_id: int, events: list[IngestEvent], job_id: int = 1) -> list[Submit]:
    job = IngestJob(project_id, events, received_ms=BASE + 48 * HOUR, skew_ms=0, ip="192.0.2.1",
                    user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0")
    return [Submit(job_id, job.project_id, job.received_ms, job.ip, job.user_agent, prepare(job))]


def _visits_stored(conn, project_id: int) -> set[frozenset[str]]:
    """The events of each stored session, by uuid."""
    found: dict[int, set[str]] = {}
    for session_id, uid in conn.execute("SELECT session_id, uuid FROM events WHERE project_id = ?", (project_id,)):
        found.setdefault(session_id, set()).add(str(uuid.UUID(bytes=uid)))
    return {frozenset(uids) for uids in found.values()}


def test_the_writer_finds_a_visit_again_after_a_crash_and_after_its_cache_is_emptied(db, project, monkeypatch):
    """A visit whose last event is only in the changes kept in memory when the writer dies goes on after
    the restart (the replay rebuilds it); so does one whose cached state was dropped (the table has it).
    verify agrees with every row."""
    from pulse.storage.sqlite import identities
    from pulse.storage.sqlite.applier import BatchApplier
    from pulse.storage.sqlite.maintenance import verify

    monkeypatch.setattr(identities, "CACHE_LIMIT", 1)  # every flush empties the cache of current visits
    sent: dict[str, list[tuple[int, str]]] = {}
    uids: dict[tuple[str, int], str] = {}

    def events(*items: tuple[str, int]) -> list[IngestEvent]:
        made = []
        for who, minutes in items:
            uid = uuid.uuid4()
            ts = BASE + 9 * HOUR + minutes * MINUTE
            uids[(who, ts)] = str(uid)
            sent.setdefault(who, []).append((ts, "/"))
            made.append(IngestEvent(event="page_view", uuid=uid, distinct_id=who, timestamp=ts,
                                    page_url="https://site.example/"))
        return made

    applier = BatchApplier(db)
    with db:
        applier.apply(_submit(project.id, events(("eve", 0), ("fay", 0), ("gus", 0))), flush=True)
    with db:  # flushed: eve's and fay's visits are whole in the table, and the cache is emptied
        applier.apply(_submit(project.id, events(("eve", 20), ("fay", 25))), flush=True)
    with db:  # kept in memory only: eve's visit now ends at 40, the table says 20
        applier.apply(_submit(project.id, events(("eve", 40), ("gus", -45))), flush=False)
    applier = BatchApplier(db)  # the writer died; the next one replays the events after derived_through
    with db:  # 65 is within 30 minutes of 40 only; fay's 50 is within 30 of the 25 the table holds
        applier.apply(_submit(project.id, events(("eve", 65), ("fay", 50), ("gus", 20))), flush=False)
    applier = BatchApplier(db)
    with db:
        applier.apply(_submit(project.id, events(("eve", 90), ("gus", 45))), flush=True)

    expected = {frozenset(uids[(who, ts)] for ts, _ in visit)
                for who in sent for visit in split_visits({who: sent[who]})}
    assert len(expected) == 4  # eve 0-90, fay 0-50, gus -45 and gus 0-45
    assert _visits_stored(db, project.id) == expected
    assert [str(d) for d in verify(db)] == []
    keys = [key for (key,) in db.execute("SELECT session_key FROM sessions")]
    assert len(set(keys)) == 4 and all(key.startswith("$auto:") for key in keys)


async def test_a_client_session_id_in_the_inferred_form_is_taken_for_none(client, project):
    """Keys starting `$auto:` are the writer's own: a client's is ignored, so it cannot take one of them."""
    start = BASE + 9 * HOUR
    await post(client, project, [page(start, "/", distinct_id="hal", session_id="$auto:1"),
                                 page(start + MINUTE, "/x", distinct_id="ivy", session_id="$auto:1")])
    expected = expected_numbers(split_visits({"hal": [(start, "/")], "ivy": [(start + MINUTE, "/x")]}))
    assert await read_numbers(client, project) == expected


# -- backends are not bots --------------------------------------------------------------------------

FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


async def test_a_backend_s_events_count_and_the_visitor_s_agent_and_ip_it_forwards_are_used(client, project):
    """Posted with urllib's own User-Agent (`Python-urllib/3.x`, which reads as a bot): counted. An event
    carrying a crawler's user_agent is a bot's; two carrying a browser's user_agent and different ips (no
    distinct id) are two users of that browser, OS and device."""
    import asyncio
    import json
    import urllib.request

    start = BASE + 9 * HOUR
    body = json.dumps({"events": [
        event("api_call", distinct_id="server-side", timestamp=start),
        event("crawl", user_agent=GOOGLEBOT, ip="66.249.66.1", timestamp=start + 1),
        event("browse", user_agent=FIREFOX, ip="203.0.113.1", timestamp=start + 2),
        event("browse", user_agent=FIREFOX, ip="203.0.113.2", timestamp=start + 3),
    ]}).encode()
    request = urllib.request.Request(str(client.make_url("/api/v1/events/ingest")), data=body, method="POST",
                                     headers={"X-API-Key": project.ingest_key, "Content-Type": "application/json"})
    assert request.get_header("User-agent") is None  # urllib sends its own, Python-urllib/3.x

    def send() -> int:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    assert await asyncio.to_thread(send) == 202
    headers = {"Authorization": f"Bearer {project.read_token}"}
    base = f"/api/v1/projects/{project.id}"

    async def get(path: str) -> dict:
        response = await client.get(f"{base}/{path}", params=WINDOW, headers=headers)
        assert response.status == 200
        return await response.json()

    overview = await get("overview")
    assert (overview["events"], overview["unique_users"]) == (3, 3)  # the crawler's event is left out
    top = {row["value"]: (row["count"], row["unique_users"]) for row in (await get("top-events"))["rows"]}
    assert top == {"api_call": (1, 1), "browse": (2, 2)}
    for breakdown, value in (("browsers", "Firefox"), ("os", "Windows"), ("devices", "desktop")):
        rows = {row["value"]: (row["count"], row["unique_users"]) for row in (await get(breakdown))["rows"]}
        assert rows[value] == (2, 2), (breakdown, rows)


# -- the client's address behind trusted proxies ----------------------------------------------------


async def users_by_address(aiohttp_client, settings, project, requests: list[dict], **overrides) -> int:
    """Send one anonymous event per set of headers (from 127.0.0.1); how many users they make (the anonymous
    user is the hash of the client's address and user agent, the same for every request here)."""
    import dataclasses

    from pulse.server.app import create_app

    client = await aiohttp_client(create_app(dataclasses.replace(settings, trust_proxy=True, **overrides)))
    for headers in requests:
        await post(client, project, [event("page_view", timestamp=BASE + 9 * HOUR)], **headers)
    response = await client.get(f"/api/v1/projects/{project.id}/overview", params=WINDOW,
                                headers={"Authorization": f"Bearer {project.read_token}"})
    return (await response.json())["unique_users"]


async def test_entries_a_client_puts_left_of_the_proxy_s_are_ignored(aiohttp_client, settings, project):
    """The proxy (127.0.0.1, trusted by default) appends the address it saw; what the client wrote before
    it (any address it likes) does not make it another user."""
    assert await users_by_address(aiohttp_client, settings, project, [
        {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"},
        {"X-Forwarded-For": "198.51.100.2,203.0.113.5"},
        {"X-Forwarded-For": "203.0.113.5"},
    ]) == 1


async def test_a_chain_through_two_trusted_proxies_gives_the_client(aiohttp_client, settings, project):
    """Through a proxy at 10.0.0.2 and then one on the host: the client is the address the first trusted
    proxy saw, whichever header carries the chain."""
    assert await users_by_address(aiohttp_client, settings, project, [
        {"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 10.0.0.2"},
        {"Forwarded": 'for=198.51.100.2, for=203.0.113.9;proto=https, for="10.0.0.2:4711"'},
        {"Forwarded": 'for="[2001:db8::7]";proto=https', "X-Forwarded-For": "203.0.113.9"},  # Forwarded first
        {"X-Real-IP": "203.0.113.9"},
        {"X-Forwarded-For": "203.0.113.10, 10.0.0.2"},
    ], trusted_proxies="127.0.0.0/8, 10.0.0.0/8") == 3  # 203.0.113.9, 2001:db8::7 and 203.0.113.10


async def test_an_untrusted_peer_s_forwarding_headers_are_ignored(aiohttp_client, settings, project):
    """When the direct peer is not a trusted proxy, its headers say nothing: the peer is the client."""
    assert await users_by_address(aiohttp_client, settings, project, [
        {"X-Forwarded-For": "203.0.113.5"},
        {"Forwarded": "for=203.0.113.6"},
        {"X-Real-IP": "203.0.113.7"},
    ], trusted_proxies="10.0.0.0/8") == 1


def test_serve_refuses_a_trusted_proxy_that_is_no_network(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pulse.cli", "serve", "--trust-proxy", "--trusted-proxies",
                           "10.0.0.0/8,proxy.example", "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "error: trusted_proxies: not an IP network: 'proxy.example'\n"


# -- a key works as soon as it is made --------------------------------------------------------------


async def test_a_key_made_by_the_cli_works_at_once_against_a_running_server(tmp_path, monkeypatch):
    """`pulse projects create` and `pulse keys rotate` beside a running `pulse serve` (which would see the
    change only at its next catalog poll, a minute away here): the first event sent with the new key is
    taken, and the rotated-out key is refused."""
    import asyncio
    import json
    import signal

    import aiohttp

    from tests.servers import Server, pulse

    monkeypatch.setenv("PULSE_CATALOG_POLL_S", "60")
    data_dir = tmp_path / "data"
    pulse("projects", "create", "first", "--json", data_dir=data_dir)  # the database exists before the server
    server = Server(data_dir)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            async def send(key: str) -> int:
                async with session.post(f"{server.url}/api/v1/events/ingest", json={"events": [event()]},
                                        headers={"X-API-Key": key}) as response:
                    return response.status

            made = json.loads((await asyncio.to_thread(pulse, "projects", "create", "shop", "--json",
                                                       data_dir=data_dir)).stdout)
            assert await send(made["ingest_key"]) == 202
            rotated = json.loads((await asyncio.to_thread(pulse, "keys", "rotate", "shop", "--ingest", "--json",
                                                          data_dir=data_dir)).stdout)
            assert await send(rotated["ingest_key"]) == 202
            assert await send(made["ingest_key"]) == 401
    finally:
        assert await asyncio.to_thread(server.stop, signal.SIGTERM) == 0


async def test_unknown_keys_do_not_reload_the_catalog_each_time(aiohttp_client, settings, make_project):
    """Keys nobody made, sent again and again (the same one, or a new one each time), reload the catalog
    never: it has not changed. A key made meanwhile reloads it once, and its request is taken."""
    import dataclasses

    from pulse.server.app import create_app
    from pulse.server.keys import KEYRING

    make_project("first")
    client = await aiohttp_client(create_app(dataclasses.replace(settings, catalog_poll_s=3600)))
    keyring = client.app[KEYRING]
    reloads = 0
    notify = keyring.on_reload

    async def counted() -> None:
        nonlocal reloads
        reloads += 1
        if notify is not None:
            await notify()

    keyring.on_reload = counted

    async def send(key: str) -> int:
        response = await client.post("/api/v1/events/ingest", json={"events": [event()]}, headers={"X-API-Key": key})
        return response.status

    garbage = [f"pk_garbage{n % 5 if n < 50 else n}" for n in range(100)]
    assert [await send(key) for key in garbage] == [401] * 100
    assert reloads == 0
    made = make_project("second")
    assert await send(made.ingest_key) == 202
    assert reloads == 1
    assert [await send(key) for key in garbage] == [401] * 100
    assert reloads == 1
