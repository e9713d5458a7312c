"""`pulse share create|list|revoke`: the link, its lifetime, and naming one to revoke."""

from __future__ import annotations

import json

from pulse.storage.model import SHARE, digest
from pulse.storage.sqlite.connection import connect

DAY_MS = 86_400_000


def made(run, *args: str) -> dict:
    result = run("share", "create", "site", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_create_prints_a_link_with_the_token_in_its_fragment_and_keeps_only_a_digest(run, tmp_path):
    assert run("projects", "create", "site").exit_code == 0
    share = made(run, "--public-url", "https://pulse.example/")
    assert share["url"] == f"https://pulse.example/dashboard/1#share={share['token']}"
    assert share["token"].startswith("sh_") and share["expires_at"] is None and share["active"]
    text = run("share", "create", "site")
    assert text.exit_code == 0 and "http://127.0.0.1:8000/dashboard/1#share=sh_" in text.output
    conn = connect(tmp_path / "data" / "pulse.db", readonly=True)
    stored = conn.execute("SELECT digest, prefix FROM shares WHERE id = ?", (share["id"],)).fetchone()
    assert stored == (digest(share["token"]), share["token"][:9])
    assert share["token"] not in (tmp_path / "data" / "pulse.db").read_bytes().decode("latin-1")


def test_expires_sets_the_end_and_list_shows_it(run):
    assert run("projects", "create", "site").exit_code == 0
    month = made(run, "--expires", "30d")
    assert month["expires_at"] - month["created_at"] == 30 * DAY_MS
    hours = made(run, "--expires", "12h")
    assert hours["expires_at"] - hours["created_at"] == 12 * 3_600_000
    forever = made(run)
    listed = json.loads(run("share", "list", "site", "--json").output)["shares"]
    assert [(s["id"], s["prefix"], s["expires_at"], s["active"]) for s in listed] == [
        (s["id"], s["token"][:9] + "…", s["expires_at"], True) for s in (month, hours, forever)]
    assert "never" in run("share", "list", "site").output
    for bad in ("0d", "30", "1y", "-1d"):
        result = run("share", "create", "site", "--expires", bad)
        assert result.exit_code == 2 and "--expires" in result.output, bad


def test_an_expired_link_is_listed_inactive_and_not_granted(run, tmp_path):
    assert run("projects", "create", "site").exit_code == 0
    share = made(run, "--expires", "1s")
    conn = connect(tmp_path / "data" / "pulse.db")
    conn.execute("UPDATE shares SET expires_at = created_at - 1 WHERE id = ?", (share["id"],))  # its second is over
    listed = json.loads(run("share", "list", "site", "--json").output)["shares"]
    assert [s["active"] for s in listed] == [False]
    from pulse.storage.sqlite.shares import load_grants

    grant = load_grants(conn)[digest(share["token"])]
    assert grant.kind == SHARE and not grant.valid(share["created_at"])


def test_revoke_by_id_prefix_or_token_and_errors(run):
    assert run("projects", "create", "site").exit_code == 0
    first, second, third = made(run), made(run), made(run)
    assert run("share", "revoke", "site", str(first["id"])).exit_code == 0
    by_prefix = run("share", "revoke", "site", second["prefix"], "--json")
    assert by_prefix.exit_code == 0 and json.loads(by_prefix.output)["revoked"]["id"] == second["id"]
    assert run("share", "revoke", "site", third["token"]).exit_code == 0
    assert json.loads(run("share", "list", "site", "--json").output)["shares"] == []
    again = run("share", "revoke", "site", str(first["id"]))
    assert again.exit_code == 1 and "no share link" in again.output
    assert run("share", "create", "nope").exit_code == 1


def test_deleting_the_project_deletes_its_links(run, tmp_path):
    assert run("projects", "create", "site").exit_code == 0
    made(run)
    assert run("projects", "delete", "site", "--yes").exit_code == 0
    conn = connect(tmp_path / "data" / "pulse.db", readonly=True)
    assert conn.execute("SELECT count(*) FROM shares").fetchone()[0] == 0
