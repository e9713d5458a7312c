"""The writer's rollups of countries, languages and screen classes (hourly_dims dims 3, 4, 5): rebuilt from the
stored events after a crash like the others, and events stored before the columns existed are left out."""

from __future__ import annotations

import uuid

from pyroaring import BitMap

from pulse.protocol import IngestEvent
from pulse.storage.model import IngestJob
from pulse.storage.sqlite.applier import BatchApplier
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.maintenance import verify
from pulse.storage.sqlite.rows import prepare
from pulse.storage.sqlite.schema import MIGRATIONS, _visitor_dimensions, migrate
from pulse.storage.sqlite.wire import Submit

BASE = 1_790_000_000_000
WIDTHS = (320, 800, 1200, 1920)


def submit(job_id: int, country: str | None, language: str | None, events: list[IngestEvent]) -> Submit:
    job = IngestJob(1, events, BASE, 0, f"192.0.2.{job_id}", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
                    country=country, language=language)
    return Submit(job_id, 1, BASE, job.ip, job.user_agent, prepare(job), job.country)


def batch() -> list[Submit]:
    """Visitors from two countries, events with and without their own language, over several hours."""
    found = []
    for number, (country, header) in enumerate((("GB", "en"), ("DE", None), (None, "fr"))):
        events = [IngestEvent(event="page_view", uuid=uuid.uuid4(), distinct_id=f"u{number}-{i % 3}",
                              page_url="https://site.example/", timestamp=BASE + i * 1_500_000,
                              language="pt-BR" if i % 4 == 0 else None, screen_width=WIDTHS[i % 4] if i % 5 else None)
                  for i in range(12)]
        found.append(submit(number + 1, country, header, events))
    return found


def dims(conn) -> dict:
    found: dict = {}
    for dim, hour, value, events, user_set in conn.execute(
            "SELECT d.dim, d.hour, s.value, d.events, d.user_set FROM hourly_dims d JOIN strings s ON s.id = d.value_id"
            " WHERE d.dim IN (3, 4, 5)"):
        total = found.setdefault((dim, hour, value), [0, BitMap()])
        total[0] += events
        total[1] |= BitMap.deserialize(user_set)
    return {key: (events, len(users)) for key, (events, users) in found.items()}


def expected(jobs: list[Submit]) -> dict:
    """The same rollups recounted from the jobs as sent, in plain Python."""
    counted: dict = {}
    for job in jobs:
        for ev in job.events:
            ts, distinct_id, language, screen = ev[1], ev[3], ev[15], ev[16]
            for dim, value in ((3, job.country), (4, language), (5, screen)):
                if value is not None:
                    total = counted.setdefault((dim, ts // 3_600_000, value), [0, set()])
                    total[0] += 1
                    total[1].add(distinct_id)
    return {key: (events, len(users)) for key, (events, users) in counted.items()}


def test_kept_dimension_rollups_are_rebuilt_after_a_crash(tmp_path):
    conn = connect(tmp_path / "p.db")
    migrate(conn)
    conn.execute("INSERT INTO projects(name, created_at) VALUES ('site', 0)")
    jobs = batch()
    with conn:
        BatchApplier(conn).apply(jobs, flush=False)  # committed events, rollup changes kept in memory only
    assert dims(conn) == {}
    applier = BatchApplier(conn)  # a new writer: replays the events after derived_through
    with conn:
        applier.apply([], flush=True)
    assert dims(conn) == expected(jobs) and expected(jobs)
    assert {value for (dim, _, value) in dims(conn) if dim == 4} == {"pt", "en", "fr"}
    assert {value for (dim, _, value) in dims(conn) if dim == 5} == {"mobile", "tablet", "laptop", "desktop"}
    assert verify(conn) == []
    conn.close()


def test_events_from_before_the_migration_have_no_values_and_verify_clean(tmp_path):
    conn = connect(tmp_path / "p.db")
    migrate(conn)
    conn.execute("INSERT INTO projects(name, created_at) VALUES ('site', 0)")
    with conn:
        BatchApplier(conn).apply(batch()[:1])
    # back to the schema before these columns, with the events and rollups of an older pulse
    conn.execute("DELETE FROM hourly_dims WHERE dim IN (3, 4, 5)")
    for column in ("country_id", "language_id", "screen_id"):
        conn.execute(f"ALTER TABLE events DROP COLUMN {column}")
    conn.execute(f"PRAGMA user_version = {MIGRATIONS.index(_visitor_dimensions)}")
    migrate(conn)
    assert conn.execute("SELECT count(*), count(country_id), count(language_id), count(screen_id) FROM events"
                        ).fetchone() == (12, 0, 0, 0)
    assert verify(conn) == []
    conn.close()
