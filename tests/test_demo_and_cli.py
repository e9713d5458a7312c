"""`pulse serve --demo` keeps its keys, the page at /, `projects show`, repeated read parameters, `pulse backup`
into a new directory, and the settings in `pulse serve --help`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
from datetime import datetime, timezone

import aiohttp
import pytest

from tests.servers import Server


# -- pulse serve --demo ------------------------------------------------------------------------------


class DemoServer(Server):
    """`pulse serve --demo` on a free port, its output in a file of its own."""

    def __init__(self, data_dir, log_path) -> None:
        super().__init__(data_dir, "--demo", log_path=log_path)

    async def keys(self) -> tuple[str, str]:
        await self.start()
        text = self.log_path.read_text()
        return (re.search(r"ingest key: (\S+)", text).group(1), re.search(r"read token: (\S+)", text).group(1))

    def stop(self) -> None:
        super().stop(signal.SIGTERM)


async def test_serve_demo_keeps_its_keys_across_restarts(tmp_path):
    data_dir = tmp_path / "data"
    first = DemoServer(data_dir, tmp_path / "first.log")
    try:
        ingest_key, read_token = await first.keys()
        for _ in range(1200):  # the new project gets a week of traffic in the background; its end is reported
            if "demo traffic seeded: " in first.log_path.read_text():
                break
            await asyncio.sleep(0.1)
        assert re.search(r"demo traffic seeded: [\d,]+ events", first.log_path.read_text())
    finally:
        first.stop()
    keys_file = data_dir / "demo.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600

    second = DemoServer(data_dir, tmp_path / "second.log")
    try:
        assert await second.keys() == (ingest_key, read_token)
        event = {"event": "page_view", "distinct_id": "u1", "page_url": "https://example.com/"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{second.url}/api/v1/events/ingest", json={"events": [event]},
                                    headers={"X-API-Key": ingest_key}) as response:
                assert response.status == 202, await response.text()
            project = json.loads(keys_file.read_text())["project"]
            async with session.get(f"{second.url}/api/v1/projects/{project}/overview",
                                   headers={"Authorization": f"Bearer {read_token}"}) as response:
                assert response.status == 200, await response.text()
    finally:
        second.stop()


# -- GET / ----------------------------------------------------------------------------------------------


async def test_root_is_a_page_linking_the_demo_health_and_tui(client):
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert 'href="/demo/"' in page and 'href="/health"' in page
    assert 'href="/docs"' in page and "pulse tui --data-dir" in page
    assert "<script" not in page


# -- pulse projects show ------------------------------------------------------------------------------


def test_projects_show_prints_created_at_as_a_date_and_no_none(run):
    created = json.loads(run("projects", "create", "shop", "--json").output)
    text = run("projects", "show", "shop").output
    assert "None" not in text
    assert str(created["created_at"]) not in text
    when = datetime.fromtimestamp(created["created_at"] // 1000, tz=timezone.utc)
    assert re.search(r"created_at:\s+" + re.escape(f"{when:%Y-%m-%dT%H:%M:%SZ}"), text), text
    shown = json.loads(run("projects", "show", "shop", "--json").output)
    assert shown["created_at"] == created["created_at"]  # --json keeps epoch ms


# -- repeated read parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "range=7d&range=24h", "from=2026-01-01&from=2026-01-02", "to=2026-02-01&to=2026-02-02&from=2026-01-01",
    "limit=5&limit=6", "interval=day&interval=hour", "cursor=1.2&cursor=3.4", "dimension=source&dimension=medium",
])
async def test_a_repeated_parameter_is_a_400_naming_it(client, project, query):
    name = query.split("=")[0]
    endpoint = {"cursor": "events", "dimension": "utm", "interval": "timeseries", "limit": "top-events"}.get(
        name, "overview")
    response = await client.get(f"/api/v1/projects/{project.id}/{endpoint}?{query}",
                                headers={"Authorization": f"Bearer {project.read_token}"})
    assert response.status == 400, await response.text()
    body = await response.json()
    assert body["field"] == name and "given twice" in body["error"]


# -- pulse backup ----------------------------------------------------------------------------------


def test_backup_into_a_new_directory_names_the_file(run, tmp_path):
    run("projects", "create", "shop")
    target = tmp_path / "backups" / "nightly"
    result = run("backup", f"{target}/", "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)["path"]
    assert os.path.dirname(written) == str(target.resolve()) and written.endswith(".db")
    assert os.path.getsize(written) == json.loads(result.output)["bytes"]
    text = run("backup", str(tmp_path / "fresh")).output  # no .db suffix, not there yet: a directory
    files = list((tmp_path / "fresh").iterdir())
    assert len(files) == 1 and str(files[0]) in text
    single = tmp_path / "copy.db"  # a .db name is the file itself
    assert str(single) in run("backup", str(single)).output and single.is_file()


# -- pulse serve --help -----------------------------------------------------------------------------


def test_serve_help_lists_every_setting_with_its_default(run):
    from dataclasses import fields

    from pulse.config import Settings

    text = run("serve", "--help").output
    assert "PULSE_QUEUE_MAX_EVENTS [100000]" in text and "PULSE_WRITE_TIMEOUT_S [5.0]" in text
    for field in fields(Settings):
        assert f"PULSE_{field.name.upper()}" in text
