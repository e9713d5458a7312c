"""`pulse share`: links that show one project's web dashboard to someone without its read token.

The link carries its token in the URL's fragment (`/dashboard/ID#share=sh_…`): browsers send no fragment to a
server, nor in a `Referer`, so the token stays out of access logs; the page sends it as a bearer token. The token
reads the dashboard's aggregates of that one project and nothing else; revoked or expired, it stops working
within the server's catalog poll, its open live feeds too. Safe while the server runs."""

from __future__ import annotations

import re
from pathlib import Path

import click

from pulse.cli.common import ask_store, data_dir_option, emit, handle_errors, iso, json_option, settings_for, table
from pulse.storage.base import Store

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_DURATION_RE = re.compile(r"^(\d{1,6})([smhd])$")


def parse_duration(_ctx: click.Context, _param: click.Parameter, raw: str | None) -> int | None:
    """`30d`, `12h`, `90m`, `45s` as seconds; None when not given."""
    if raw is None:
        return None
    found = _DURATION_RE.match(raw.strip())
    if found is None or int(found[1]) == 0:
        raise click.BadParameter(f"expected a positive number and a unit s, m, h or d (30d), got {raw!r}")
    return int(found[1]) * DURATION_UNITS[found[2]]


def share_url(base_url: str, project_id: int, secret: str) -> str:
    return f"{base_url}/dashboard/{project_id}#share={secret}"


@click.group()
def share() -> None:
    """Create, list and revoke links to a project's web dashboard."""


@share.command("create")
@click.argument("project")
@click.option("--expires", callback=parse_duration, metavar="DURATION",
              help="The link stops working after this long: 30d, 12h, 90m (default: until revoked).")
@click.option("--public-url", default=None, envvar="PULSE_PUBLIC_URL", help="Server address the link starts with.")
@data_dir_option
@json_option
@handle_errors
def share_create(project: str, expires: int | None, public_url: str | None, data_dir: Path, as_json: bool) -> None:
    """Make a share link: it shows PROJECT's dashboard (numbers only, no visitor's events) to whoever has it."""
    settings = settings_for(data_dir, public_url=public_url)

    async def question(store: Store) -> tuple[str, int, dict, str]:
        found = await store.get_project(project)
        row, secret = await store.create_share(found, expires_in_s=expires)
        return found.name, found.id, row, secret

    name, project_id, row, secret = ask_store(settings, question)
    url = share_url(settings.base_url, project_id, secret)
    until = f"until {iso(row['expires_at'])}" if row["expires_at"] is not None else "until revoked"
    emit(as_json, {"project": name, **row, "token": secret, "url": url}, "\n".join([
        f"share link {row['id']} for project {name} ({until}; shown once):",
        f"  {url}",
    ]))


@share.command("list")
@click.argument("project")
@data_dir_option
@json_option
@handle_errors
def share_list(project: str, data_dir: Path, as_json: bool) -> None:
    """List a project's share links (their prefixes: the tokens are not kept)."""
    async def question(store: Store) -> tuple[str, list[dict]]:
        found = await store.get_project(project)
        return found.name, await store.list_shares(found)

    name, found = ask_store(settings_for(data_dir), question)
    rows = [(s["id"], s["prefix"], iso(s["created_at"]), iso(s["expires_at"]) or "never",
             "yes" if s["active"] else "expired") for s in found]
    emit(as_json, {"project": name, "shares": found},
         table(rows, ["id", "prefix", "created", "expires", "active"]) if found else f"no share links for project {name}")


@share.command("revoke")
@click.argument("project")
@click.argument("share_ref", metavar="ID_OR_PREFIX")
@data_dir_option
@json_option
@handle_errors
def share_revoke(project: str, share_ref: str, data_dir: Path, as_json: bool) -> None:
    """Revoke a share link, named by its id or token prefix (from `pulse share list`) or the whole token."""
    async def question(store: Store) -> tuple[str, dict]:
        found = await store.get_project(project)
        return found.name, await store.revoke_share(found, share_ref)

    name, row = ask_store(settings_for(data_dir), question)
    emit(as_json, {"project": name, "revoked": row}, f"revoked share link {row['id']} ({row['prefix']}) of project {name}")
