"""The ClickHouse store's lists and people questions against real ClickHouse (one 18.16 server, a two-shard
cluster behind two `pulse serve` nodes, chdb): property keys and values, trait keys and values, users, a
user's timeline, sessions and events paged by cursor through every row, and the prop./trait./utm_ filters, alone
and together; each answer equals a recount in plain Python of the events sent and the SQLite store's answer.
Property values are strings, integers, floats, booleans and nulls; traits come from identify and `$set`-style
event traits (a later value wins, a null removes one); one visitor identifies mid-stream."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest

from pulse.config import Settings
from pulse.storage.base import open_store
from tests.clickhouse.test_store_core import _store_url, clickhouse, nodes, read, send, sqlite_reference  # noqa: F401
from tests.clickhouse_servers import MISSING

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

MINUTE = 60_000
PROPS = [{"plan": "pro", "n": 1, "price": 9.5, "ok": True}, {"plan": "free", "n": 2, "price": 0.1, "ok": False},
         {"plan": "1", "n": 1, "ok": None}, {"plan": "pro", "price": 100.0, "x\"y": 3}, {"n": 0}, None]


def traffic(now: int) -> list[list[dict]]:
    """Six visitors over the last few hours, every event at its own millisecond."""
    events = []
    ts = now - 5 * 60 * MINUTE
    for k in range(6):
        anon = f"anon{k}"
        for step in range(5):
            ts += 7 * MINUTE + k * 1000 + step
            event = {"event": "page_view" if step % 2 == 0 else "click", "uuid": str(uuid.uuid4()),
                     "distinct_id": anon, "timestamp": ts}
            if event["event"] == "page_view":
                event["page_url"] = f"https://shop.example/p{step}" + ("?utm_source=news" if k % 3 == 0 else "")
            props = PROPS[(k + step) % len(PROPS)]
            if props is not None:
                event["properties"] = props
            if k in (1, 4) and step == 2:  # identify mid-stream, with traits
                event.update(event="$identify", distinct_id=f"user{k}", anon_id=anon,
                             traits={"tier": "gold" if k == 1 else 2, "beta": True})
            elif k in (1, 4) and step > 2:
                event["distinct_id"] = f"user{k}"
            if k == 1 and step == 4:  # a later set changes one trait and removes another
                event["traits"] = {"tier": 1.5, "beta": None}
            if k == 2 and step == 1:
                event["traits"] = {"tier": "gold"}
            events.append(event)
    return [events[i:i + 4] for i in range(0, len(events), 4)]


def recount(batches: list[list[dict]], window: tuple[int, int]) -> dict:
    """Persons, traits and per-key property values as pulse defines them, from what was sent."""
    person: dict[str, str] = {}
    name: dict[str, str] = {}
    traits: dict[str, dict] = {}
    rows = []
    for event in (e for batch in batches for e in batch):
        if "anon_id" in event:
            person[event["distinct_id"]] = person.get(event["anon_id"], event["anon_id"])
            name[person[event["distinct_id"]]] = event["distinct_id"]
        who = person.setdefault(event["distinct_id"], event["distinct_id"])
        if "traits" in event:
            merged = traits.setdefault(who, {})
            for key, value in event["traits"].items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
        rows.append((event, who))
    rows = [(e, who) for e, who in rows if window[0] <= e["timestamp"] < window[1]]
    return {"rows": rows, "name": name, "traits": traits, "person": person}


def text(value) -> str | None:
    """SQLite's text of a JSON value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


async def ask(session, url, project, token, window, endpoint, **params) -> dict:
    status, body = await read(session, url, project, token, endpoint, **window, **params)
    assert status == 200, (endpoint, params, body)
    return {k: v for k, v in body.items() if k != "project"}


async def paged(session, url, project, token, window, endpoint, **params) -> list[dict]:
    rows, cursor = [], None
    while True:
        extra = {"limit": "2", **params, **({"cursor": cursor} if cursor else {})}
        body = await ask(session, url, project, token, window, endpoint, **extra)
        rows += body["rows"]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows


FILTERS = [{}, {"prop.plan": "pro"}, {"prop.n": "1"}, {"prop.ok": "1"}, {"prop.ok": "0"}, {"prop.price": "0.1"},
           {"prop.price": "100.0"}, {"prop.plan": "1"}, {"trait.tier": "gold"}, {"trait.tier": "1.5"},
           {"trait.tier": "2"}, {"utm_source": "news"}, {"utm_source": "news", "prop.plan": "pro"},
           {"trait.beta": "1", "prop.n": "1"}]


def inferred(session_id: str) -> str:
    return "$auto" if session_id.startswith("$auto:") else session_id


async def everything(session, url, project, token, window, persons) -> dict:
    found = {}
    for filters in FILTERS:
        key = json.dumps(filters)
        overview = await ask(session, url, project, token, window, "overview", **filters)
        found[f"overview {key}"] = {k: overview[k] for k in ("events", "unique_users", "sessions", "bounce_rate")}
        found[f"properties {key}"] = await ask(session, url, project, token, window, "properties", **filters)
        for prop in ("plan", "n", "price", "ok"):
            found[f"property {prop} {key}"] = await ask(session, url, project, token, window, f"properties/{prop}",
                                                        **filters)
        found[f"traits {key}"] = await ask(session, url, project, token, window, "traits", **filters)
        found[f"trait tier {key}"] = await ask(session, url, project, token, window, "traits/tier", **filters)
        found[f"users {key}"] = await paged(session, url, project, token, window, "users", **filters)
        found[f"events {key}"] = await paged(session, url, project, token, window, "events", **filters)
        sessions = await paged(session, url, project, token, window, "sessions", **filters)
        found[f"sessions {key}"] = [{**row, "session_id": inferred(row["session_id"])} for row in sessions]
    for distinct_id in persons:
        found[f"user {distinct_id}"] = await paged(session, url, project, token, window, f"users/{distinct_id}")
    return found


async def sqlite_everything(tmp_path: Path, batches, window, persons) -> dict:
    return await sqlite_reference(tmp_path, batches, lambda session, url, project: everything(
        session, url, project["id"], project["read_token"], window, persons))


def check_recount(found: dict, expected: dict) -> None:
    """The answers under no filter and under single filters, recounted from the events sent."""
    rows, name, traits = expected["rows"], expected["name"], expected["traits"]

    def matching(filters: dict) -> list:
        kept = []
        for event, who in rows:
            props = event.get("properties") or {}
            ok = all(text(props.get(k[5:])) == v for k, v in filters.items() if k.startswith("prop."))
            ok = ok and all(text(traits.get(who, {}).get(k[6:])) == v for k, v in filters.items()
                            if k.startswith("trait."))
            if ok:
                kept.append((event, who))
        return kept

    for filters in FILTERS:
        if any(k.startswith("utm") for k in filters):
            continue
        key = json.dumps(filters)
        kept = matching(filters)
        overview = found[f"overview {key}"]
        assert (overview["events"], overview["unique_users"]) == (len(kept), len({who for _, who in kept})), key
        assert [r["uuid"] for r in found[f"events {key}"]] == [
            e["uuid"] for e, _ in sorted(kept, key=lambda pair: -pair[0]["timestamp"])], key
        for prop in ("plan", "n", "price", "ok"):
            values: dict[str, list] = {}
            for event, who in kept:
                value = text((event.get("properties") or {}).get(prop))
                if value is not None:
                    values.setdefault(value, []).append(who)
            assert sorted((r["value"], r["count"], r["unique_users"]) for r in found[f"property {prop} {key}"]["rows"]
                          ) == sorted((v, len(w), len(set(w))) for v, w in values.items()), (prop, key)
        active = {who for _, who in kept}
        tiers: dict[str, int] = {}
        for who in active:
            if "tier" in traits.get(who, {}):
                tiers[text(traits[who]["tier"])] = tiers.get(text(traits[who]["tier"]), 0) + 1
        assert {r["value"]: r["count"] for r in found[f"trait tier {key}"]["rows"]} == tiers, key
        identified = {who for who in active if who in traits or who in name}
        users = found[f"users {key}"]
        assert sorted((u["distinct_id"], u["window_events"]) for u in users) == sorted(
            (name.get(who, who), sum(1 for _, w in kept if w == who)) for who in identified), key
        for user in users:
            who = expected["person"][user["distinct_id"]]
            assert user["traits"] == (traits[who] if who in traits else None)


@pytest.mark.parametrize("backend", ["single", "cluster", "chdb"])
async def test_lists_and_people_match_a_recount_and_the_sqlite_store(backend, clickhouse, tmp_path):  # noqa: F811
    url = _store_url(backend, clickhouse, tmp_path)
    async with open_store(Settings(data_dir=tmp_path / "cli", store=url), serve=False) as store:
        project, ingest_key, read_token = await store.create_project("shop")
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    batches = traffic(now)
    start, end = now - 6 * 60 * MINUTE, now
    window = {"from": datetime.fromtimestamp(start / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
              "to": datetime.fromtimestamp(end / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}
    persons = ["anon0", "user1", "anon1", "anon4", "nobody"]
    async with nodes(backend, url, tmp_path) as urls, aiohttp.ClientSession() as session:
        for i, batch in enumerate(batches):
            assert (await send(session, urls[i % len(urls)], ingest_key, batch))[0] == 202
        found = await everything(session, urls[-1], project.id, read_token, window, persons[:-1])
        status, _ = await read(session, urls[0], project.id, read_token, "users/nobody", **window)
        assert status == 404
        status, body = await read(session, urls[0], project.id, read_token, "overview", **window,
                                  **{'prop.x"y': "3"})
        assert status == 501, body
    expected = recount(batches, (int(datetime.fromisoformat(window["from"] + "+00:00").timestamp() * 1000),
                                 int(datetime.fromisoformat(window["to"] + "+00:00").timestamp() * 1000)))
    check_recount(found, expected)
    assert found["users {}"] and found['events {"prop.plan": "pro"}'] and found['sessions {"utm_source": "news"}']
    reference = await sqlite_everything(tmp_path, batches, window, persons[:-1])
    for key in reference:
        assert found[key] == reference[key], key
