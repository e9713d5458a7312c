import pytest

from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.schema import MIGRATIONS, SchemaTooNew, current_version, migrate


def test_migrate_creates_schema_and_is_idempotent(tmp_path):
    conn = connect(tmp_path / "p.db")
    assert migrate(conn) == len(MIGRATIONS)
    assert migrate(conn) == len(MIGRATIONS)
    assert current_version(conn) == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"projects", "keys", "events", "hourly", "sessions", "persons", "person_ids", "salts", "strings"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_refuses_database_newer_than_code(tmp_path):
    conn = connect(tmp_path / "p.db")
    migrate(conn)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaTooNew, match="newer than this pulse"):
        migrate(conn)
    conn.close()


def test_migration_2_rolls_up_events_stored_before_it(tmp_path):
    """Dropping hourly_dims and migrating again rebuilds exactly what the writer had kept."""
    import uuid

    from pyroaring import BitMap

    from pulse.protocol import IngestEvent
    from pulse.storage.sqlite.applier import BatchApplier
    from pulse.storage.model import IngestJob
    from pulse.storage.sqlite.rows import prepare
    from pulse.storage.sqlite.wire import Submit

    conn = connect(tmp_path / "p.db")
    migrate(conn)
    conn.execute("INSERT INTO projects(name, created_at) VALUES ('site', 0)")
    applier = BatchApplier(conn)
    base = 1_790_000_000_000
    for agent in ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0", "curl/8.5.0"):
        events = [IngestEvent(event="page_view" if i % 3 else "click", uuid=uuid.uuid4(), distinct_id=f"u{i % 7}",
                              session_id=f"s{i % 5}", page_url=f"https://site.example/p{i % 4}", timestamp=base + i * 600_000)
                  for i in range(40)]
        job = IngestJob(1, events, base, 0, "192.0.2.1", agent)
        with conn:
            applier.apply([Submit(1, 1, base, job.ip, job.user_agent, prepare(job))])

    def dims():
        found = {}
        for project, dim, hour, value, bot, events, user_set in conn.execute(
            "SELECT project_id, dim, hour, value_id, bot, events, user_set FROM hourly_dims"
        ):
            total = found.setdefault((project, dim, hour, value, bot), [0, BitMap()])
            total[0] += events
            total[1] |= BitMap.deserialize(user_set)
        return found

    kept = dims()
    assert {key[1] for key in kept} == {1, 2}
    days = list(conn.execute("SELECT project_id, day FROM session_days"))
    assert days
    conn.execute("DROP TABLE hourly_dims")
    conn.execute("DROP TABLE session_days")
    conn.execute("ALTER TABLE projects DROP COLUMN allowed_origins")  # back to schema 1
    conn.execute("PRAGMA user_version = 1")
    migrate(conn)
    assert dims() == kept
    # migration 5 marks every day on which a stored session starts, as newer than anything cached
    assert list(conn.execute("SELECT project_id, day FROM session_days")) == days
    assert conn.execute("SELECT min(generation) FROM session_days").fetchone()[0] >= 80
    conn.close()
