"""The CLI through Click's runner on a real data directory."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from pulse.cli import main


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [p for p, _ in all_commands(main)], ids=" ".join)
def test_every_command_has_help(run, path):
    result = run(*path, "--help")
    assert result.exit_code == 0
    command = dict(all_commands(main))[path]
    assert command.help, f"{' '.join(path)} has no help text"


def test_projects_create_prints_keys_once_and_tag(run):
    result = run("projects", "create", "shop", "--domain", "https://Shop.Example/", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["name"] == "shop" and body["domain"] == "shop.example"
    assert body["ingest_key"].startswith("pk_") and body["read_token"].startswith("sk_")
    assert f'data-project="{body["ingest_key"]}"' in body["script_tag"]
    shown = run("projects", "show", "shop", "--json")
    assert body["read_token"] not in shown.output and body["ingest_key"] not in shown.output
    text = run("projects", "create", "blog").output
    assert "ingest key:  pk_" in text and "read token:  sk_" in text and "<script" in text


def test_list_show_update_delete(run):
    run("projects", "create", "shop")
    listing = json.loads(run("projects", "list", "--json").output)
    assert [p["name"] for p in listing["projects"]] == ["shop"]
    updated = run("projects", "update", "shop", "--timezone", "Europe/Berlin", "--retention-days", "30", "--json")
    assert json.loads(updated.output)["timezone"] == "Europe/Berlin"
    assert "Europe/Berlin" in run("projects", "list").output
    refused = run("projects", "delete", "shop")
    assert refused.exit_code == 1 and "--yes" in refused.output
    assert run("projects", "delete", "shop", "--yes").exit_code == 0
    assert run("projects", "list").output.strip() == "no projects"


def test_errors_are_one_line_and_non_zero(run):
    run("projects", "create", "shop")
    for args, message in [
        (("projects", "create", "shop"), "already exists"),
        (("projects", "show", "nope"), "no project 'nope'"),
        (("projects", "create", "x", "--timezone", "Mars/Base"), "unknown time zone"),
        (("projects", "create", "bad/name"), "invalid project name"),
        (("keys", "rotate", "shop"), "--ingest or --read"),
        (("keys", "rotate", "nope", "--read"), "no project"),
    ]:
        result = run(*args)
        assert result.exit_code == 1, args
        assert result.output.count("\n") == 1 and message in result.output, result.output


def test_keys_rotate_and_list(run):
    created = json.loads(run("projects", "create", "shop", "--json").output)
    rotated = json.loads(run("keys", "rotate", "shop", "--ingest", "--json").output)
    assert rotated["ingest_key"].startswith("pk_") and rotated["ingest_key"] != created["ingest_key"]
    listed = json.loads(run("keys", "list", "shop", "--json").output)["keys"]
    assert sorted(k["kind"] for k in listed) == ["ingest", "read"]
    graced = json.loads(run("keys", "rotate", "shop", "--read", "--grace", "60", "--json").output)
    assert graced["old_key_expires_in"] == 60
    listed = json.loads(run("keys", "list", "shop", "--json").output)["keys"]
    assert sorted(k["kind"] for k in listed) == ["ingest", "read", "read"]
    assert all(k["active"] for k in listed)


def test_tui_without_a_server_says_how_to_start_one(tmp_path):
    result = CliRunner().invoke(main, ["tui", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no pulse server is running" in result.output and "--url and --token" in result.output
    result = CliRunner().invoke(main, ["tui", "--url", "http://127.0.0.1:8000"])
    assert result.exit_code == 1 and "--url needs --token" in result.output
