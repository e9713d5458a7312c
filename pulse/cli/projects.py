"""`pulse projects` and `pulse keys`: the catalog. Safe while the server runs: it notices changed projects and
keys within a quarter of a second."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from pulse.cli.common import (
    ask_store, data_dir_option, emit, fail, handle_errors, iso, json_option, settings_for, table,
)
from pulse.config import Settings
from pulse.storage.base import Store
from pulse.storage.model import INGEST, READ, Project


def project_keys(settings: Settings, ref: str) -> tuple[Project, list[dict[str, Any]]]:
    """A project (by id or name) and its keys' listing (prefixes only)."""
    async def question(store: Store) -> tuple[Project, list[dict[str, Any]]]:
        found = await store.get_project(ref)
        return found, await store.list_keys(found)

    return ask_store(settings, question)


def keys_table(keys: list[dict[str, Any]]) -> str:
    rows = [(k["kind"], k["prefix"], iso(k["created_at"]), iso(k["expires_at"]) or "never",
             "yes" if k["active"] else "no") for k in keys]
    return table(rows, ["kind", "prefix", "created", "expires", "active"])


def _shown(field: str, value: Any) -> Any:
    """A project's field as `projects show` prints it: times as ISO 8601 in UTC."""
    if field == "created_at":
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


# -- projects ------------------------------------------------------------------------------------


@click.group()
def projects() -> None:
    """Create, list, show, update and delete projects."""


@projects.command("create")
@click.argument("name")
@click.option("--domain", help="The site's domain, e.g. example.com (self-referrals are ignored).")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone for days and hours.")
@click.option("--retention-days", default=180, show_default=True, type=int, help="Keep raw events this long.")
@click.option("--allowed-origins", default=None, metavar="HOSTS",
              help="Only pages on these hosts (and their subdomains) may send events, e.g. 'example.com'.")
@click.option("--public-url", default=None, envvar="PULSE_PUBLIC_URL", help="Server address for the script tag.")
@data_dir_option
@json_option
@handle_errors
def projects_create(name: str, domain: str | None, timezone: str, retention_days: int, allowed_origins: str | None,
                    public_url: str | None, data_dir: Path, as_json: bool) -> None:
    """Create a project; prints its ingest key, its read token (shown once) and the script tag."""
    settings = settings_for(data_dir, public_url=public_url)
    project, ingest_key, read_token = ask_store(settings, lambda store: store.create_project(
        name, domain=domain, timezone=timezone, retention_days=retention_days, allowed_origins=allowed_origins,
    ))
    tag = settings.script_tag(ingest_key)
    emit(as_json, {**project.as_dict(), "ingest_key": ingest_key, "read_token": read_token, "script_tag": tag}, "\n".join([
        f"created project {project.id} ({project.name})",
        f"site id:     {project.site_id}   (names the project to Umami's trackers)",
        f"ingest key:  {ingest_key}",
        f"read token:  {read_token}   (shown once: store it now)",
        "script tag:",
        f"  {tag}",
    ]))


@projects.command("list")
@data_dir_option
@json_option
@handle_errors
def projects_list(data_dir: Path, as_json: bool) -> None:
    """List projects."""
    found = ask_store(settings_for(data_dir), lambda store: store.list_projects())
    rows = [(p.id, p.name, p.domain or "-", p.timezone, p.retention_days, iso(p.created_at)) for p in found]
    text = table(rows, ["id", "name", "domain", "timezone", "retention", "created"]) if found else "no projects"
    emit(as_json, {"projects": [p.as_dict() for p in found]}, text)


@projects.command("show")
@click.argument("project")
@data_dir_option
@json_option
@handle_errors
def projects_show(project: str, data_dir: Path, as_json: bool) -> None:
    """Show one project (by id or name) and its keys. Text gives created_at in UTC and leaves out empty fields;
    --json gives every field as stored (created_at in epoch ms)."""
    found, keys_found = project_keys(settings_for(data_dir), project)
    lines = [f"{k}: {_shown(k, v)}" for k, v in found.as_dict().items() if v is not None and v != ""]
    lines.append(keys_table(keys_found))
    emit(as_json, {**found.as_dict(), "keys": keys_found}, "\n".join(lines))


@projects.command("update")
@click.argument("project")
@click.option("--name", help="New name.")
@click.option("--domain", help="New domain ('' to clear).")
@click.option("--timezone", help="New IANA time zone.")
@click.option("--retention-days", type=int, help="New retention for raw events.")
@click.option("--allowed-origins", default=None, metavar="HOSTS", help="Hosts whose pages may send events ('' for any).")
@data_dir_option
@json_option
@handle_errors
def projects_update(project: str, name: str | None, domain: str | None, timezone: str | None,
                    retention_days: int | None, allowed_origins: str | None, data_dir: Path, as_json: bool) -> None:
    """Change a project's name, domain, time zone, retention or allowed origins."""
    async def question(store: Store) -> Project:
        return await store.update_project(await store.get_project(project), name=name, domain=domain,
                                          timezone=timezone, retention_days=retention_days,
                                          allowed_origins=allowed_origins)

    found = ask_store(settings_for(data_dir), question)
    emit(as_json, found.as_dict(), f"updated project {found.id} ({found.name})")


@projects.command("delete")
@click.argument("project")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@data_dir_option
@json_option
@handle_errors
def projects_delete(project: str, yes: bool, data_dir: Path, as_json: bool) -> None:
    """Delete a project, its keys and all its data."""
    settings = settings_for(data_dir)
    found = ask_store(settings, lambda store: store.get_project(project))
    if not yes:
        if not sys.stdin.isatty():
            fail("refusing to delete without --yes (no terminal to confirm on)")
        click.confirm(f"delete project {found.id} ({found.name}) and all its events?", abort=True)
    ask_store(settings, lambda store: store.delete_project(found))
    emit(as_json, {"deleted": found.id, "name": found.name}, f"deleted project {found.id} ({found.name})")


# -- keys ----------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Rotate and list ingest keys and read tokens."""


@keys.command("rotate")
@click.argument("project")
@click.option("--ingest", "kind", flag_value=INGEST, help="Rotate the ingest key (pk_…).")
@click.option("--read", "kind", flag_value=READ, help="Rotate the read token (sk_…).")
@click.option("--grace", default=0, show_default=True, type=click.IntRange(0),
              help="Seconds the old key keeps working.")
@data_dir_option
@json_option
@handle_errors
def keys_rotate(project: str, kind: str | None, grace: int, data_dir: Path, as_json: bool) -> None:
    """Make a new key; the old one stops working at once (or after --grace seconds)."""
    if kind is None:
        fail("say which key to rotate: --ingest or --read")

    async def question(store: Store) -> tuple[Project, str]:
        found = await store.get_project(project)
        return found, await store.rotate_key(found, kind, grace_seconds=grace)

    found, secret = ask_store(settings_for(data_dir), question)
    field = "ingest_key" if kind == INGEST else "read_token"
    when = f"in {grace}s" if grace else "now"
    emit(as_json, {"project": found.id, "kind": kind, field: secret, "old_key_expires_in": grace},
         f"new {kind} key for project {found.id} ({found.name}): {secret}\nthe old {kind} key stops working {when}")


@keys.command("list")
@click.argument("project")
@data_dir_option
@json_option
@handle_errors
def keys_list(project: str, data_dir: Path, as_json: bool) -> None:
    """List a project's keys (prefixes only: secrets are never stored)."""
    found, keys_found = project_keys(settings_for(data_dir), project)
    emit(as_json, {"project": found.id, "keys": keys_found}, keys_table(keys_found))
