"""Hostile input at every endpoint of a real `pulse serve` (hypothesis): never a 500, never a hang,
never part of a refused batch stored. Prints how many cases ran."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pulse.storage.sqlite.connection import connect
from tests.servers import Server, pulse

pytestmark = pytest.mark.slow
CASES = {"ingest": 0, "read": 0, "headers": 0}
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5),
    max_leaves=30,
)
FIELDS = ["event", "uuid", "distinct_id", "timestamp", "session_id", "page_url", "referrer", "properties", "traits",
          "anon_id"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    project = json.loads(pulse("projects", "create", "fuzz", "--json", data_dir=data_dir).stdout)
    server = Server(data_dir)
    asyncio.run(server.start())
    state = {"server": server, "project": project, "accepted": set(), "refused": set()}
    yield state
    assert server.stop(signal.SIGTERM) == 0
    conn = connect(data_dir / "pulse.db", readonly=True)
    stored = {bytes(r[0]) for r in conn.execute("SELECT uuid FROM events")}
    conn.close()
    assert state["accepted"] <= stored, "an acknowledged event is missing"
    assert not (state["refused"] & stored), "part of a refused batch was stored"
    print(f"\nfuzz: {CASES['ingest']} ingest bodies, {CASES['read']} read requests, {CASES['headers']} header sets;"
          f" {len(state['accepted'])} events accepted, {len(state['refused'])} in refused batches, none stored")


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: list[tuple[str, bytes | str]] = ()) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # a hang fails the test
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def valid_event() -> dict:
    return {"event": "ok", "uuid": str(uuid.uuid4()), "distinct_id": "fuzzer"}


@FUZZ
@given(mutation=st.sampled_from(FIELDS), value=json_values, position=st.integers(0, 4),
       raw=st.one_of(st.none(), st.binary(max_size=300)))
def test_ingest_bodies(served, mutation, value, position, raw):
    server, key = served["server"], served["project"]["ingest_key"]
    CASES["ingest"] += 1
    if raw is not None:  # arbitrary bytes, usually not JSON, sometimes not UTF-8
        status, _ = request(server, "POST", "/api/v1/events/ingest", raw, [("X-API-Key", key)])
        assert status < 500 and status in (202, 400, 413, 422), status
        return
    events = [valid_event() for _ in range(5)]
    events[position][mutation] = value
    ids = {uuid.UUID(e["uuid"]).bytes for e in events if isinstance(e.get("uuid"), str) and _is_uuid(e["uuid"])}
    status, body = request(server, "POST", "/api/v1/events/ingest", json.dumps({"events": events}).encode(),
                           [("X-API-Key", key), ("Content-Type", "application/json")])
    assert status < 500, body
    if status == 202:
        served["accepted"] |= ids
    else:
        assert status == 400 and b"error" in body
        served["refused"] |= ids - served["accepted"]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def test_deep_nesting_oversized_and_truncated_bodies(served):
    server, key = served["server"], served["project"]["ingest_key"]
    cases = [b"[" * 100_000, b'{"events": [' + b"{" * 50_000, b'{"events": [{"event": "' + b"a" * 2_000_000 + b'"}]}',
             b'{"events": [{"event": "x", "properties": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}]}",
             b'{"events": [{"event": "\xff\xfe"}]}', b'{"events": [', b"", b"null", b'{"events": []}']
    for body in cases:
        CASES["ingest"] += 1
        status, _ = request(server, "POST", "/api/v1/events/ingest", body, [("X-API-Key", key)])
        assert status in (202, 400, 413), (status, body[:40])


ENDPOINTS = ["overview", "timeseries", "top-events", "pages", "entry-pages", "referrers", "utm", "browsers", "users",
             "sessions", "events", "properties", "properties/plan", "traits", "traits/gender", "users/someone"]
param_names = st.sampled_from(["range", "from", "to", "interval", "limit", "cursor", "dimension", "event",
                               "prop.plan", "trait.gender", "browser", "nonsense", "prop.", "trait."])


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), params=st.lists(st.tuples(param_names, st.text(max_size=30)), max_size=4),
       project=st.sampled_from(["1", "0", "999", "abc", "-1", "1e9"]))
def test_read_endpoints(served, endpoint, params, project):
    from urllib.parse import quote, urlencode

    server, token = served["server"], served["project"]["read_token"]
    CASES["read"] += 1
    query = urlencode([(k, v.encode("utf-8", "surrogatepass")) for k, v in params])
    path = f"/api/v1/projects/{quote(project)}/{endpoint}?{query}"
    status, body = request(server, "GET", path, None, [("Authorization", f"Bearer {token}")])
    assert status < 500, (path, body)
    assert status in (200, 400, 403, 404), (path, status, body)


@FUZZ
@given(path=st.sampled_from(["/api/v1/events/ingest", "/api/v1/projects", "/api/v1/projects/1/overview",
                             "/api/v1/ws/events/1", "/health", "/metrics", "/static/sdk/tracker.js", "/demo/"]),
       method=st.sampled_from(["GET", "POST", "OPTIONS", "PUT", "DELETE"]),
       values=st.lists(st.binary(min_size=0, max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b),
                       min_size=3, max_size=3))
def test_headers(served, path, method, values):
    server = served["server"]
    CASES["headers"] += 1
    headers = [("X-API-Key", values[0]), ("Authorization", b"Bearer " + values[1]), ("Content-Type", values[2]),
               ("Origin", values[2]), ("User-Agent", values[0])]
    status, body = request(server, method, path, b'{"events": []}' if method == "POST" else None, headers)
    assert status < 500, (path, method, values, body)
