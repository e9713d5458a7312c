"""Countries, languages and screen classes, end to end: events from several visitors with known IPs (v4 and v6),
languages and screen widths, over several days in a project time zone with a half-hour offset, sent through the
real ingest, and every breakdown row and filtered number recounted in plain Python from the events as generated.
One test runs a real `pulse serve` with `--geoip` a country database written here, and `pulse verify` after it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from pulse.config import Settings
from pulse.server.app import create_app
from pulse.server import geo
from pulse.server.geo import Countries, GeoipUnavailable
from pulse.storage.sqlite.maintenance import verify
from tests.servers import Server, pulse, read_api

INGEST = "/api/v1/events/ingest"
TZ = "Asia/Kolkata"  # +05:30: the window's edges fall inside UTC hours
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
# addresses whose country the data bundled with geoip2fast knows; the private one has none
COUNTRY_OF = {
    "8.8.8.8": "US", "81.2.69.160": "GB", "5.6.7.8": "DE", "10.1.2.3": None,
    "2001:4860:4860::8888": "US", "2a00:1450:4001:800::200e": "DE", "2001:67c:2e8::1": "NL",
}
LANGUAGES = ["en-US", "en", "de-DE", "pt-BR", "fr", None]
WIDTHS = [375, 575, 576, 800, 991, 992, 1280, 1439, 1440, 2560, None]


def screen_of(width: int | None) -> str | None:
    if width is None:
        return None
    return "mobile" if width < 576 else "tablet" if width < 992 else "laptop" if width < 1440 else "desktop"


def generated(now_ms: int) -> list[dict]:
    """Events of 12 visitors over the last four days: each with an IP, usually a language and a width of its own,
    now and then another one (a visitor who travels, or changes device)."""
    rng = random.Random(7)
    ips = list(COUNTRY_OF)
    found = []
    for number in range(12):
        ip, language, width = ips[number % len(ips)], rng.choice(LANGUAGES), rng.choice(WIDTHS)
        for _ in range(rng.randint(8, 20)):
            if rng.random() < 0.2:
                ip, language, width = rng.choice(ips), rng.choice(LANGUAGES), rng.choice(WIDTHS)
            ev = {"event": rng.choice(["page_view", "page_view", "click"]), "uuid": str(uuid.uuid4()),
                  "distinct_id": f"u{number}", "page_url": f"https://site.example/p{rng.randint(0, 3)}",
                  "timestamp": now_ms - rng.randint(60_000, 4 * 86_400_000), "ip": ip, "user_agent": CHROME}
            if language is not None:
                ev["language"] = language
            if width is not None:
                ev["screen_width"] = width
            found.append(ev)
    return found


def facts(ev: dict) -> dict:
    """What pulse should keep of an event: its country, base language and screen class."""
    language = ev.get("language")
    return {"country": COUNTRY_OF[ev["ip"]], "language": language.split("-")[0].lower() if language else None,
            "screen": screen_of(ev.get("screen_width"))}


def expected_rows(events: list[dict], dimension: str) -> dict[str, tuple[int, int]]:
    """{value: (events, unique users)} of the events that have a value of the dimension."""
    counted: dict[str, list] = defaultdict(lambda: [0, set()])
    for ev in events:
        value = facts(ev)[dimension]
        if value is not None:
            counted[value][0] += 1
            counted[value][1].add(ev["distinct_id"])
    return {value: (n, len(users)) for value, (n, users) in counted.items()}


def matching(events: list[dict], **wanted: str) -> list[dict]:
    return [ev for ev in events if all(facts(ev)[key] == value for key, value in wanted.items())]


def window(now_ms: int) -> dict[str, str]:
    """From local midnight five days ago to the local date of now (the last day's events fall after `to`)."""
    today = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(TZ)).date()
    return {"from": (today - timedelta(days=5)).isoformat(), "to": (today - timedelta(days=1)).isoformat()}


def inside(events: list[dict], bounds: dict[str, str]) -> list[dict]:
    start, end = (int(datetime.combine(date.fromisoformat(bounds[k]), datetime.min.time(), ZoneInfo(TZ)).timestamp()
                      * 1000) for k in ("from", "to"))
    end += 86_400_000  # `to` is a whole day, included
    return [ev for ev in events if start <= ev["timestamp"] < end]


async def read(client, project, endpoint: str, **params: str) -> dict:
    """One read-API answer of the in-process app: the last 24 hours unless `params` give from/to."""
    params = params if "from" in params else {"range": "24h", **params}
    response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params=params,
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 200, await response.text()
    return await response.json()


def rows_of(answer: dict) -> dict[str, tuple[int, int]]:
    return {row["value"]: (row["count"], row["unique_users"]) for row in answer["rows"]}


@pytest.fixture
async def zoned(make_project, aiohttp_client, settings):
    project = make_project("zoned", timezone=TZ)
    return project, await aiohttp_client(create_app(settings))


async def send(client, key: str, events: list[dict], **headers: str):
    response = await client.post(INGEST, json={"events": events}, headers={"X-API-Key": key, **headers})
    return response


async def test_breakdowns_and_filters_recount_from_the_events(zoned, db):
    project, client = zoned
    now = int(datetime.now().timestamp() * 1000)
    events = generated(now)
    for start in range(0, len(events), 25):
        response = await send(client, project.ingest_key, events[start:start + 25])
        assert response.status == 202, await response.text()
    for bounds in (window(now), {"from": window(now)["from"]}):  # whole days, and a window ending now
        wanted = inside(events, bounds) if "to" in bounds else [ev for ev in events if ev["timestamp"] >= int(
            datetime.combine(date.fromisoformat(bounds["from"]), datetime.min.time(), ZoneInfo(TZ)).timestamp() * 1000)]
        for endpoint, dimension in (("countries", "country"), ("languages", "language"), ("screens", "screen")):
            answer = await read(client, project, endpoint, limit="50", **bounds)
            assert rows_of(answer) == expected_rows(wanted, dimension), (endpoint, bounds)
        # filtered: the overview's numbers, and breakdowns under another dimension's filter (raw scans)
        for filters in ({"country": "GB"}, {"country": "us"}, {"language": "en", "screen": "mobile"},
                        {"screen": "laptop"}, {"country": "DE", "language": "de"}):
            asked = {key: value.upper() if key == "country" else value for key, value in filters.items()}
            chosen = matching(wanted, **asked)
            overview = await read(client, project, "overview", **bounds, **filters)
            assert (overview["events"], overview["unique_users"]) == (
                len(chosen), len({ev["distinct_id"] for ev in chosen})), filters
            for endpoint, dimension in (("countries", "country"), ("languages", "language"), ("screens", "screen")):
                answer = await read(client, project, endpoint, limit="50", **bounds, **filters)
                assert rows_of(answer) == expected_rows(chosen, dimension), (endpoint, filters)
        browsers = await read(client, project, "browsers", **bounds, country="DE")
        chosen = matching(wanted, country="DE")
        assert rows_of(browsers) == {"Chrome": (len(chosen), len({ev["distinct_id"] for ev in chosen}))}
    names = {"US": "United States", "GB": "United Kingdom", "DE": "Germany", "NL": "Netherlands", "en": "English",
             "de": "German", "pt": "Portuguese", "fr": "French"}
    for endpoint in ("countries", "languages"):
        labels = {row["value"]: row.get("label") for row in (await read(client, project, endpoint, **window(now)))["rows"]}
        assert len(labels) >= 3 and labels == {value: names[value] for value in labels}
    assert all("label" not in row for row in (await read(client, project, "screens", **window(now)))["rows"])
    assert verify(db) == []


async def test_accept_language_counts_for_browsers_only_and_ipv6_loads_once(zoned):
    project, client = zoned
    browser = {"User-Agent": CHROME, "Accept-Language": "fr-CH, fr;q=0.9, en;q=0.8"}
    assert (await send(client, project.ingest_key, [{"event": "a", "ip": "81.2.69.160"},
                                                     {"event": "b", "language": "es-MX", "ip": "81.2.69.160"}],
                       **browser)).status == 202
    backend = {"User-Agent": "python-requests/2.32", "Accept-Language": "de"}
    assert (await send(client, project.ingest_key, [{"event": "c", "ip": "2001:67c:2e8::1"}], **backend)).status == 202
    garbled = {"User-Agent": CHROME, "Accept-Language": "*;q=0.5, ü"}
    assert (await send(client, project.ingest_key, [{"event": "d", "ip": "2a00:1450:4001:800::200e"}],
                       **garbled)).status == 202
    assert rows_of(await read(client, project, "languages")) == {"fr": (1, 1), "es": (1, 1)}
    assert rows_of(await read(client, project, "countries")) == {"GB": (2, 1), "NL": (1, 1), "DE": (1, 1)}


@pytest.mark.parametrize("field, value", [
    ("language", "en_US"), ("language", "x" * 36), ("language", ""), ("screen_width", -1), ("screen_width", 100_001),
    ("screen_width", "1280"),
])
async def test_bad_language_or_width_is_a_400_naming_the_field(zoned, field, value):
    project, client = zoned
    response = await send(client, project.ingest_key, [{"event": "a"}, {"event": "b", field: value}])
    assert response.status == 400
    body = await response.json()
    assert f"events[1].{field}" in body["error"] and body["field"] == f"events[1].{field}"


async def test_unknown_and_private_addresses_have_no_country_and_off_looks_up_none(make_project, aiohttp_client,
                                                                                   settings, tmp_path):
    project = make_project("plain")
    client = await aiohttp_client(create_app(settings))
    assert (await send(client, project.ingest_key, [{"event": "a", "ip": "10.1.2.3", "screen_width": 400},
                                                     {"event": "b", "ip": "::1"}, {"event": "c"}])).status == 202
    assert (await read(client, project, "countries"))["rows"] == []
    assert rows_of(await read(client, project, "screens")) == {"mobile": (1, 1)}
    off = Settings(data_dir=tmp_path / "off", geoip="off")
    assert await Countries(off.geoip).country("8.8.8.8") is None
    assert await Countries("").country("8.8.8.8") == "US"


async def test_countries_keep_a_bounded_number_of_addresses(monkeypatch):
    monkeypatch.setattr(geo, "RECENT_MAX", 3)
    countries = Countries("")
    addresses = ["8.8.8.8", "10.0.0.1", "1.1.1.1", "8.8.4.4", "::1", "not an address", "8.8.8.8"]
    found = [await countries.country(ip) for ip in addresses]
    assert found == ["US", None, found[2], "US", None, None, "US"] and found[2] is not None
    assert len(countries._recent) <= 3


def write_mmdb(path) -> None:
    """A country database in MaxMind's format with a few test ranges, on purpose unlike the bundled data."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["8.8.8.0/24"]), {"country": {"iso_code": "NZ", "names": {"en": "New Zealand"}}})
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "JP"}})
    writer.insert_network(IPSet(["2001:4860::/32"]), {"country": {"iso_code": "FR"}})
    writer.insert_network(IPSet(["5.6.7.0/24"]), {"continent": {"code": "EU"}})  # no country
    writer.to_db_file(str(path))


async def test_mmdb_reader_maps_its_ranges(tmp_path):
    path = tmp_path / "country.mmdb"
    write_mmdb(path)
    countries = Countries(str(path))
    found = {ip: await countries.country(ip) for ip in ("8.8.8.8", "81.2.69.160", "2001:4860:4860::8888",
                                                         "5.6.7.8", "9.9.9.9", "10.0.0.1")}
    assert found == {"8.8.8.8": "NZ", "81.2.69.160": "JP", "2001:4860:4860::8888": "FR", "5.6.7.8": None,
                     "9.9.9.9": None, "10.0.0.1": None}
    assert {ip: await countries.country(ip) for ip in found} == found  # again, from the addresses it keeps
    (tmp_path / "broken.mmdb").write_bytes(b"not a database")
    for bad in (tmp_path / "missing.mmdb", tmp_path / "broken.mmdb"):
        with pytest.raises(GeoipUnavailable, match="--geoip"):
            Countries(str(bad))


@pytest.mark.slow
async def test_pulse_serve_with_an_mmdb_then_verify_is_clean(tmp_path):
    data = tmp_path / "data"
    path = tmp_path / "country.mmdb"
    write_mmdb(path)
    project = json.loads(pulse("projects", "create", "site", "--timezone", TZ, "--json", data_dir=data).stdout)
    missing = subprocess.run([sys.executable, "-m", "pulse.cli", "serve", "--geoip", str(tmp_path / "no.mmdb"),
                              "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "--geoip" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    server = Server(data, "--geoip", str(path), "--trust-proxy")
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for forwarded, language, width in (("8.8.8.8", "en-GB", 390), ("81.2.69.160", "ja", 1920),
                                               ("2001:4860:4860::8888", "fr-FR", 1024), ("5.6.7.8", None, None)):
                ev = {"event": "page_view", "page_url": "https://site.example/"}
                ev.update({k: v for k, v in (("language", language), ("screen_width", width)) if v is not None})
                async with session.post(f"{server.url}{INGEST}", json={"events": [ev, dict(ev, event="click")]},
                                        headers={"X-API-Key": project["ingest_key"], "User-Agent": CHROME,
                                                 "X-Forwarded-For": forwarded}) as response:
                    assert response.status == 202, await response.text()
        countries = await read_api(server, project, "countries")
        assert [(r["value"], r["count"], r["unique_users"], r.get("label")) for r in countries["rows"]] == [
            ("FR", 2, 1, "France"), ("JP", 2, 1, "Japan"), ("NZ", 2, 1, "New Zealand")]
        assert rows_of(await read_api(server, project, "screens")) == {
            "mobile": (2, 1), "desktop": (2, 1), "laptop": (2, 1)}
        assert rows_of(await read_api(server, project, "languages", country="JP")) == {"ja": (2, 1)}
        overview = await read_api(server, project, "overview", screen="laptop")
        assert (overview["events"], overview["unique_users"]) == (2, 1)
    finally:
        assert server.stop(15) == 0
    checked = subprocess.run([sys.executable, "-m", "pulse.cli", "verify", "--json", "--data-dir", str(data)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
