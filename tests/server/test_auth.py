"""Keys and tokens: ingest keys only send, read tokens only read, each for its own project only."""

from __future__ import annotations

import asyncio

from pulse.server.keys import STORE
from pulse.storage.sqlite.projects import get_project, rotate_key
from tests.conftest import event

INGEST = "/api/v1/events/ingest"


async def post(client, key):
    return await client.post(INGEST, json={"events": [event()]}, headers={"X-API-Key": key})


async def overview(client, project_id, token):
    return await client.get(f"/api/v1/projects/{project_id}/overview", headers={"Authorization": f"Bearer {token}"})


async def wait_for_status(call, status, attempts=50):
    """The server reloads keys when the catalog changes (polled); wait for it to take effect."""
    for _ in range(attempts):
        response = await call()
        if response.status == status:
            return response
        await asyncio.sleep(0.05)
    return response


async def test_missing_and_unknown_keys_are_401(client, project):
    response = await client.post(INGEST, json={"events": [event()]})
    assert response.status == 401
    assert "X-API-Key" in (await response.json())["error"]
    assert (await post(client, "pk_made_up")).status == 401
    response = await client.get(f"/api/v1/projects/{project.id}/overview")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_ingest_key_cannot_read_and_read_token_cannot_send(client, project):
    response = await overview(client, project.id, project.ingest_key)
    assert response.status == 403
    assert "ingest keys cannot read" in (await response.json())["error"]
    response = await post(client, project.read_token)
    assert response.status == 403


async def test_token_of_project_a_cannot_touch_project_b(aiohttp_client, settings, make_project):
    from pulse.server.app import create_app

    a = make_project("a")
    b = make_project("b")
    client = await aiohttp_client(create_app(settings))
    assert (await overview(client, b.id, a.read_token)).status == 403
    assert (await overview(client, a.id, a.read_token)).status == 200
    assert (await overview(client, 999, a.read_token)).status == 403


async def test_rotated_key_stops_working_at_once(client, project, db):
    assert (await post(client, project.ingest_key)).status == 202
    new_key = rotate_key(db, get_project(db, project.id), "ingest")  # as `pulse keys rotate` does
    assert (await wait_for_status(lambda: post(client, project.ingest_key), 401)).status == 401
    assert (await post(client, new_key)).status == 202


async def test_rotation_with_grace_keeps_old_key_for_a_while(client, project, db):
    new_token = rotate_key(db, get_project(db, project.id), "read", grace_seconds=3600)
    assert (await wait_for_status(lambda: overview(client, project.id, new_token), 200)).status == 200
    assert (await overview(client, project.id, project.read_token)).status == 200


async def test_deleted_project_keys_are_refused(client, project, db):
    from pulse.storage.sqlite.projects import delete_project

    delete_project(db, get_project(db, project.id))
    assert (await wait_for_status(lambda: post(client, project.ingest_key), 401)).status == 401


async def test_a_deleted_project_leaves_nothing_and_its_id_is_never_given_again(client, project, db):
    from pulse.storage.sqlite.projects import create_project, delete_project

    response = await client.post(INGEST, json={"events": [event(session_id="s1", page_url="https://a.example/x")]},
                                 headers={"X-API-Key": project.ingest_key})
    assert response.status == 202
    delete_project(db, get_project(db, project.id))
    # the writer's next commit writes what it kept in memory: none of it may belong to the deleted project
    await client.server.app[STORE].writer.settle()
    tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    left = {table: db.execute(f"SELECT count(*) FROM {table} WHERE project_id = ?", (project.id,)).fetchone()[0]
            for table in tables if any(c[1] == "project_id" for c in db.execute(f"PRAGMA table_info({table})"))}
    assert set(left) >= {"events", "hourly", "hourly_dims", "sessions", "session_days", "persons"}
    assert not any(left.values()), left
    again, _, _ = create_project(db, "next")
    assert again.id > project.id


async def test_operator_token_reads_every_project_and_lists_them(aiohttp_client, settings, make_project):
    import dataclasses

    from pulse.server.app import create_app

    a = make_project("a")
    b = make_project("b", timezone="Asia/Kolkata")
    operator = dataclasses.replace(settings, operator_token="sk_local_test")
    client = await aiohttp_client(create_app(operator))
    for project in (a, b):
        response = await client.post(INGEST, json={"events": [event(), event()]},
                                     headers={"X-API-Key": project.ingest_key})
        assert response.status == 202
        assert (await overview(client, project.id, "sk_local_test")).status == 200
    assert (await overview(client, 999, "sk_local_test")).status == 404

    response = await client.get("/api/v1/projects", headers={"Authorization": "Bearer sk_local_test"})
    listed = (await response.json())["projects"]
    assert [(p["id"], p["name"], p["timezone"]) for p in listed] == [(a.id, "a", "UTC"), (b.id, "b", "Asia/Kolkata")]
    assert all(p["events_today"] == 2 and sum(p["hourly"]) == 2 and len(p["hourly"]) in (24, 25) for p in listed)

    response = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {a.read_token}"})
    assert [p["id"] for p in (await response.json())["projects"]] == [a.id]
    response = await client.get("/api/v1/projects", headers={"Authorization": f"Bearer {a.ingest_key}"})
    assert response.status == 403
    response = await client.get("/api/v1/projects", headers={"Authorization": "Bearer sk_local_guess"})
    assert response.status == 401
