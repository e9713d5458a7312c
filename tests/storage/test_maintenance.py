"""verify, prune, backup and export on a database filled through the real server."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pulse.storage.model import DAY_MS, HOUR_MS
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.maintenance import backup, export, prune, pruned_before, verify
from pulse.storage.sqlite.projects import get_project
from tests.server.test_analytics import BASE, generate


@pytest.fixture
async def filled(aiohttp_client, settings, make_project):
    from pulse.server.app import create_app

    project = make_project("shop", domain="site.example")
    client = await aiohttp_client(create_app(settings))
    requests, sent, _ = generate()
    for request in requests:
        response = await client.post("/api/v1/events/ingest", json={"events": request["events"]},
                                     headers={"X-API-Key": project.ingest_key, "User-Agent": request["agent"]})
        assert response.status == 202
    # a read waits until the writer has written the session and person changes it keeps in memory
    response = await client.get(f"/api/v1/projects/{project.id}/overview",
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 200
    return project, sent, requests


async def test_verify_finds_nothing_on_a_consistent_database_and_every_tampered_number(filled, settings, db):
    project, _, _ = filled
    assert verify(db) == []
    db.execute("UPDATE hourly SET events = events + 1 WHERE (project_id, hour, name_id, bot, seq) IN"
               " (SELECT project_id, hour, name_id, bot, seq FROM hourly WHERE name_id != 0 LIMIT 1)")
    db.execute("UPDATE sessions SET pageviews = pageviews + 2 WHERE id = (SELECT min(id) FROM sessions)")
    db.execute("UPDATE persons SET event_count = event_count - 1 WHERE id = (SELECT max(id) FROM persons)")
    db.execute("DELETE FROM hourly_dims WHERE (project_id, dim, hour, value_id, bot, seq) IN"
               " (SELECT project_id, dim, hour, value_id, bot, seq FROM hourly_dims WHERE dim = 2 LIMIT 1)")
    db.execute("DELETE FROM session_days WHERE day = (SELECT max(day) FROM session_days)")
    found = verify(db)
    assert sorted({d.what for d in found}) == ["hourly", "hourly_dims", "person", "session", "session_days"]
    assert len(found) == 5, [str(d) for d in found]


async def test_prune_deletes_old_raw_events_only_and_verify_still_agrees(filled, settings, db):
    project, sent, _ = filled
    shop = get_project(db, project.id)
    now = BASE + shop.retention_days * DAY_MS + 2 * DAY_MS + 30 * 60_000  # two days and a half hour are past
    before = {(h, n, b): e for h, n, b, e in db.execute("SELECT hour, name_id, bot, sum(events) FROM hourly GROUP BY 1, 2, 3")}
    deleted = prune(db, now, chunk=50)
    cutoff = (now - shop.retention_days * DAY_MS) // HOUR_MS * HOUR_MS
    expected = sum(1 for e in sent if e.ts < cutoff) + sum(1 for i in range(30) if BASE + i * HOUR_MS < cutoff)
    assert deleted == {"shop": expected} and expected > 100
    assert pruned_before(db, project.id) == cutoff
    assert db.execute("SELECT count(*) FROM events WHERE ts < ?", (cutoff,)).fetchone()[0] == 0
    after = {(h, n, b): e for h, n, b, e in db.execute("SELECT hour, name_id, bot, sum(events) FROM hourly GROUP BY 1, 2, 3")}
    assert after == before  # aggregates untouched
    assert verify(db) == []
    assert prune(db, now) == {"shop": 0}


async def test_backup_is_a_consistent_copy(filled, settings, tmp_path):
    written, size = backup(settings.db_path, tmp_path / "copy.db")
    assert written == (tmp_path / "copy.db").resolve()
    copy = connect(tmp_path / "copy.db", readonly=True)
    live = connect(settings.db_path, readonly=True)
    try:
        assert size > 0
        assert copy.execute("SELECT count(*) FROM events").fetchone() == live.execute("SELECT count(*) FROM events").fetchone()
        assert verify(copy) == []
    finally:
        copy.close()
        live.close()
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_export_streams_every_event_in_the_window(filled, settings, db, fmt):
    project, sent, _ = filled
    start, end = BASE + 6 * HOUR_MS, BASE + 50 * HOUR_MS
    out = io.StringIO()
    written = export(db, project.id, start, end, fmt, out)
    expected = sorted((e.ts, e.name) for e in sent if start <= e.ts < end)
    expected_bots = sum(1 for i in range(30) if start <= BASE + i * HOUR_MS < end)
    assert written == len(expected) + expected_bots
    out.seek(0)
    if fmt == "csv":
        rows = list(csv.DictReader(out))
        names = [r["event"] for r in rows]
    else:
        rows = [json.loads(line) for line in out]
        names = [r["event"] for r in rows]
        assert any(r["properties"] == {"plan": "pro"} for r in rows)
    assert len(rows) == written and names.count("$identify") == sum(1 for _, n in expected if n == "$identify")
    assert all(r["timestamp"].endswith("Z") for r in rows)
