import pytest

from pulse.storage.connection import connect
from pulse.storage.schema import MIGRATIONS, SchemaTooNew, current_version, migrate


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
