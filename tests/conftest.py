"""Shared fixtures: a real database file, the real app under aiohttp's test client, projects with keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from pyroaring import BitMap

from pulse.cli import main as cli_main
from pulse.config import Settings
from pulse.server.app import create_app
from pulse.storage.model import HOUR_MS
from pulse.storage.sqlite.connection import connect
from pulse.storage.sqlite.projects import create_project
from pulse.storage.sqlite.schema import migrate


@dataclass
class ProjectKeys:
    id: int
    name: str
    ingest_key: str
    read_token: str


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", synchronous="NORMAL", catalog_poll_s=0.05)


@pytest.fixture
def run(tmp_path):
    """`pulse …` in this process (Click's runner) on a data directory of the test's own."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli_main, [*args], env={"PULSE_DATA_DIR": str(tmp_path / "data")})

    return invoke


@pytest.fixture
def db(settings: Settings):
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(settings.db_path)
    migrate(conn)
    yield conn
    conn.close()


@pytest.fixture
def make_project(db):
    def make(name: str = "site", **kwargs) -> ProjectKeys:
        project, ingest_key, read_token = create_project(db, name, **kwargs)
        return ProjectKeys(project.id, project.name, ingest_key, read_token)

    return make


@pytest.fixture
def project(make_project) -> ProjectKeys:
    return make_project("site", domain="site.example")


@pytest.fixture
async def client(aiohttp_client, settings, project):
    """The real application on a real database, with one project created before it starts."""
    return await aiohttp_client(create_app(settings))


def event(name: str = "page_view", **fields) -> dict:
    body = {"event": name, "uuid": str(uuid.uuid4())}
    body.update(fields)
    return body


async def read(client, project: ProjectKeys, endpoint: str, **params) -> dict:
    """One read-API answer from the in-process app (`client`), range 24h unless `params` say otherwise."""
    response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}", params={"range": "24h", **params},
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 200, await response.text()
    return await response.json()


async def counts(client, project: ProjectKeys, endpoint: str) -> dict[str, int]:
    """A ranked endpoint's rows as {value: count}."""
    return {row["value"]: row["count"] for row in (await read(client, project, endpoint))["rows"]}


def recount(conn, project_id: int, start_ms: int | None = None, end_ms: int | None = None) -> dict:
    """Totals recounted straight from the raw events table, independent of the rollups."""
    where = "e.project_id = ? AND coalesce(a.is_bot, 0) = 0"
    args: list = [project_id]
    if start_ms is not None:
        where += " AND e.ts >= ? AND e.ts < ?"
        args += [start_ms, end_ms]
    row = conn.execute(
        "SELECT count(*), count(DISTINCT e.person_id), count(DISTINCT e.session_id)"
        f" FROM events e LEFT JOIN agents a ON a.id = e.agent_id WHERE {where}",
        args,
    ).fetchone()
    return {"events": row[0], "unique_users": row[1], "sessions": row[2]}


def rollups(conn, project_id):
    """Each rollup key's events, users, sessions and sets, summed over the key's rows."""
    found: dict = {}
    for hour, name_id, bot, events, users, sessions, us, ss in conn.execute(
        "SELECT hour, name_id, bot, events, users, sessions, user_set, session_set FROM hourly WHERE project_id = ?",
        (project_id,),
    ):
        user_set, session_set = BitMap.deserialize(us), BitMap.deserialize(ss)
        total = found.get((hour, name_id, bot))
        if total is not None:
            assert not (total[3] & user_set) and not (total[4] & session_set), "rows of one key overlap"
            user_set |= total[3]
            session_set |= total[4]
            events, users, sessions = events + total[0], users + total[1], sessions + total[2]
        found[(hour, name_id, bot)] = (events, users, sessions, user_set, session_set)
    return found


def recount_hourly(conn, project_id):
    """Per (hour, event name) and per hour (name 0): count, distinct users, distinct sessions, from raw rows."""
    found = {}
    for grouping in ("e.name_id", "0"):
        for hour, name_id, bot, count, users, sessions in conn.execute(
            f"SELECT e.ts / {HOUR_MS}, {grouping}, a.is_bot, count(*), count(DISTINCT e.person_id),"
            " count(DISTINCT e.session_id) FROM events e JOIN agents a ON a.id = e.agent_id"
            f" WHERE e.project_id = ? GROUP BY 1, 2, 3",
            (project_id,),
        ):
            found[(hour, name_id, bot)] = (count, users, sessions)
    return found


# the store a test runs on: SQLite, and the two-shard ClickHouse cluster behind two `pulse serve` nodes
from tests.stores import clickhouse_cluster, shared_cluster, store_backend  # noqa: E402, F401
