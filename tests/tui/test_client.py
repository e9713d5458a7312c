"""The TUI's client and query state without Textual: discovery of the local server, errors, memory."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from pulse.config import SERVER_FILENAME
from pulse.server.app import serve_lock
from pulse.tui.client import ApiFailure, Backoff, LiveState, PulseClient, discover
from pulse.tui.state import DashboardQuery, FilterMemory, change, clean
from tests.tui.conftest import OPERATOR


def test_discover_reads_the_running_servers_file_and_refuses_loose_permissions(tmp_path, tui_settings):
    with pytest.raises(ApiFailure, match="no pulse server is running"):
        discover(tui_settings.data_dir)
    with serve_lock(tui_settings):
        path = tui_settings.data_dir / SERVER_FILENAME
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        found = discover(tui_settings.data_dir)
        assert found.token == OPERATOR and found.url == f"http://127.0.0.1:{tui_settings.port}"
        os.chmod(path, 0o644)
        with pytest.raises(ApiFailure, match="readable by others"):
            discover(tui_settings.data_dir)
    assert not (tui_settings.data_dir / SERVER_FILENAME).exists()  # gone with the server


async def test_errors_name_the_problem(server):
    client = PulseClient(server.url, "sk_wrong")
    with pytest.raises(ApiFailure) as failure:
        await client.projects()
    assert failure.value.status == 401 and "invalid or revoked read token" in failure.value.message
    await client.close()
    client = PulseClient(server.url, OPERATOR)
    with pytest.raises(ApiFailure) as failure:
        await client.project_get(server.project.id, "overview", {"range": "1y"})
    assert failure.value.status == 400 and "range" in failure.value.message
    await client.close()
    gone = PulseClient("http://127.0.0.1:9", OPERATOR)
    with pytest.raises(ApiFailure) as failure:
        await gone.projects()
    assert failure.value.status == 0 and "cannot reach" in failure.value.message
    await gone.close()


async def test_live_feed_refused_with_a_wrong_token_stops_instead_of_retrying(server):
    states: list[LiveState] = []
    client = PulseClient(server.url, "sk_wrong")
    await client.live(server.project.id, lambda events: None, states.append)
    assert [s.status for s in states] == ["connecting", "failed"] and "401" in states[-1].detail
    await client.close()


def test_backoff_grows_to_a_ceiling_and_resets():
    backoff = Backoff(base=0.5, ceiling=4.0)
    delays = [backoff.next() for _ in range(6)]
    assert 0.4 <= delays[0] <= 0.6 and all(d <= 4.0 * 1.2 for d in delays) and delays[4] >= 3.2
    backoff.reset()
    assert backoff.next() <= 0.6


def test_memory_round_trip_and_bad_files(tmp_path):
    memory = FilterMemory(tmp_path / "pulse" / "tui.json")
    assert memory.get("http://a", 1) == DashboardQuery()
    query = DashboardQuery(range="custom", start="2026-03-01", end="2026-03-05",
                           filters=(("trait.gender", "Female"), ("event", "signup")), interval="hour")
    memory.put("http://a", 1, query)
    memory.put("http://a", 2, DashboardQuery(range="30d"))
    assert memory.get("http://a", 1) == query and memory.get("http://a", 2).range == "30d"
    assert memory.get("http://b", 1) == DashboardQuery()
    memory.path.write_text(json.dumps({"http://a#1": {"range": "1y", "filters": [["nope", "x"], ["os", "iOS"]],
                                                      "interval": "minute"}}))
    assert memory.get("http://a", 1) == DashboardQuery(filters=(("os", "iOS"),))
    memory.path.write_text("not json")
    assert memory.get("http://a", 1) == DashboardQuery()


def test_query_params_follow_the_api_grammar():
    query = DashboardQuery(range="90d", filters=(("trait.age_group", "18-40"),), interval="hour", chart_event="signup")
    assert query.params() == {"range": "90d", "trait.age_group": "18-40"}
    assert query.timeseries_params() == {"range": "90d", "trait.age_group": "18-40", "interval": "day",
                                         "event": "signup"}  # hourly stops at 31 days
    assert query.with_filter("trait.age_group", "<18").filters == (("trait.age_group", "<18"),)


def test_clean_and_change():
    assert clean("a\x1b[31mb\x07\x9bc\td") == "a�[31mb��c d"
    assert change(110, 100, 100) == ("▲10%", 1) and change(90, 100, 100) == ("▼10%", -1)
    assert change(5, 0, 0) == ("new", 0) and change(0, 0, 0) == ("", 0)
    assert change(37_304, 16, 16) == ("", 0)  # too few events before to compare
    assert change(37_304, 20, 20) == ("▲1,865×", 1) and change(1099, 100, 100) == ("▲999%", 1)


async def test_a_restarted_local_server_is_found_again(server, memory):
    """On the server's host the token changes with every server start; the client reads it again on a 401."""
    from pulse.tui.client import Connection

    states: list[LiveState] = []
    client = PulseClient(server.url, "sk_local_from_before_the_restart",
                         rediscover=lambda: Connection(server.url, OPERATOR))
    assert [p.name for p in await client.projects()] == ["shop"] and client.token == OPERATOR
    stale = PulseClient(server.url, "sk_local_stale", rediscover=lambda: Connection(server.url, OPERATOR))
    task = asyncio.create_task(stale.live(server.project.id, lambda events: None, states.append))
    for _ in range(100):
        if states and states[-1].status == "live":
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [s.status for s in states] == ["connecting", "connecting", "live"]
    await client.close()
    await stale.close()
