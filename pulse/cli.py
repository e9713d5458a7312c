"""The `pulse` command: a thin Click layer over storage and server. Server and TUI are imported lazily."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from pulse.config import Settings

EXIT_ERROR = 1  # the request cannot be done (not found, invalid value, already running)


def data_dir_option(fn: Callable) -> Callable:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="PULSE_DATA_DIR",
        default="pulse-data",
        show_default=True,
        help="Directory holding the database (env PULSE_DATA_DIR).",
    )(fn)


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")(fn)


def fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn known failures into one clear line on stderr and a non-zero exit."""
    from pulse.storage.model import ProjectError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProjectError as exc:
            fail(str(exc))
        except ValueError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))

    return wrapper


@contextmanager
def open_db(data_dir: Path) -> Iterator[Any]:
    from pulse.storage.sqlite.connection import connect
    from pulse.storage.sqlite.schema import SchemaTooNew, migrate

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the database and the operator token are private
    conn = connect(Settings(data_dir=data_dir).db_path)
    try:
        migrate(conn)
    except SchemaTooNew as exc:
        conn.close()
        fail(str(exc))
    try:
        yield conn
    finally:
        conn.close()


def emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(payload) if as_json else text)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def project_keys(data_dir: Path, ref: str) -> tuple[Any, list[dict[str, Any]]]:
    """A project (by id or name) and its keys' listing (prefixes only)."""
    from pulse.storage.sqlite.projects import get_project, list_keys

    with open_db(data_dir) as conn:
        found = get_project(conn, ref)
        return found, list_keys(conn, found)


def keys_table(keys: list[dict[str, Any]]) -> str:
    rows = [(k["kind"], k["prefix"], iso(k["created_at"]), iso(k["expires_at"]) or "never",
             "yes" if k["active"] else "no") for k in keys]
    return table(rows, ["kind", "prefix", "created", "expires", "active"])


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pulse")
def main() -> None:
    """pulse: self-hosted event analytics in one process."""


# -- serve ---------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="PULSE_HOST", help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), envvar="PULSE_PORT")
@data_dir_option
@click.option("--demo", is_flag=True, help="Create (or refresh) a project named 'demo' and print its keys.")
@click.option("--ack", type=click.Choice(["commit", "enqueue"]), default=None,
              help="Answer 202 after the commit (default, durable) or as soon as the batch is queued.")
@click.option("--public-url", default=None, envvar="PULSE_PUBLIC_URL",
              help="Address sites use to reach this server, for the script tag.")
@click.option("--trust-proxy", is_flag=True, default=None, help="Take client IPs from X-Forwarded-For.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="info (default): one line per refused request; debug: every request.")
@handle_errors
def serve(host: str, port: int, data_dir: Path, demo: bool, ack: str | None, public_url: str | None,
          trust_proxy: bool | None, log_level: str | None) -> None:
    """Run the server: ingest, read API, live feed, SDK and demo page."""
    from pulse.server.app import AlreadyRunning, run

    settings = Settings.from_env(host=host, port=port, data_dir=data_dir, ack=ack, public_url=public_url,
                                 trust_proxy=trust_proxy, log_level=log_level)
    seeder = None
    if demo:
        with open_db(data_dir) as conn:
            settings = dataclasses.replace(settings, demo_ingest_key=_print_demo(conn, settings))
            empty = conn.execute("SELECT 1 FROM events e JOIN projects p ON p.id = e.project_id"
                                 " WHERE p.name = 'demo' LIMIT 1").fetchone() is None
        if empty:  # a week of traffic through the HTTP API, so the numbers are not all zero
            click.echo("  seeding 7 days of demo traffic in the background (scripts/seed_events.py)")
            seeder = subprocess.Popen(
                [sys.executable, "-m", "pulse.seed", "--url", f"http://{host}:{port}", "--key",
                 settings.demo_ingest_key, "--wait", "30"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
    try:
        run(settings, print_fn=lambda line: click.echo(line))
    except AlreadyRunning as exc:
        fail(str(exc))
    finally:
        if seeder is not None and seeder.poll() is None:
            seeder.terminate()


# -- tui ------------------------------------------------------------------------------------------


@main.command()
@click.option("--url", default=None, envvar="PULSE_URL", help="Server address; default: the server of --data-dir.")
@click.option("--token", default=None, envvar="PULSE_TOKEN", help="Read token (sk_…) when --url is given.")
@data_dir_option
@click.option("--project", "project_id", type=int, default=None, help="Open this project's dashboard at once.")
@click.option("--track-self", "track_key", default=None, metavar="KEY",
              help="Send the dashboard's own usage to the project of this ingest key.")
@click.option("--track-url", default=None, help="Server for --track-self; default: the one watched.")
def tui(url: str | None, token: str | None, data_dir: Path, project_id: int | None, track_key: str | None,
        track_url: str | None) -> None:
    """The terminal dashboard. On the server's host it needs no flags; elsewhere --url and --token."""
    import getpass
    import socket

    from pulse.tui.client import ApiFailure, Connection, PulseClient, SelfTracker, discover

    if url and not token:
        fail("--url needs --token (a project's read token, sk_…)")
    if token and not url:
        fail("--token needs --url (where the server listens)")
    try:
        connection = Connection(url, token) if url and token else discover(data_dir)
    except ApiFailure as exc:
        fail(exc.message)
    from pulse.tui.app import PulseApp

    tracker = None
    if track_key:
        tracker = SelfTracker(track_url or connection.url, track_key, f"{getpass.getuser()}@{socket.gethostname()}")
    rediscover = None if url else (lambda: discover(data_dir))  # a restarted local server has a new token
    client = PulseClient(connection.url, connection.token, rediscover=rediscover)
    PulseApp(client, tracker=tracker, open_project=project_id).run()


def _print_demo(conn: Any, settings: Settings) -> str:
    from pulse.storage.model import INGEST, READ, ProjectNotFound
    from pulse.storage.sqlite import projects

    try:
        project = projects.get_project(conn, "demo")
        ingest_key = projects.rotate_key(conn, project, INGEST)
        read_token = projects.rotate_key(conn, project, READ)
    except ProjectNotFound:
        project, ingest_key, read_token = projects.create_project(conn, "demo")
    click.echo(f"demo project {project.id}")
    click.echo(f"  ingest key: {ingest_key}")
    click.echo(f"  read token: {read_token}")
    click.echo(f"  try: curl -X POST {settings.base_url}/api/v1/events/ingest -H 'X-API-Key: {ingest_key}' "
               """-d '{"events":[{"event":"page_view","distinct_id":"u1","page_url":"https://example.com/"}]}'""")
    click.echo(f"  then: curl -H 'Authorization: Bearer {read_token}' "
               f"{settings.base_url}/api/v1/projects/{project.id}/overview")
    click.echo(f"  demo page: {settings.base_url}/demo/")
    return ingest_key


# -- projects ------------------------------------------------------------------------------------


@main.group()
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
    from pulse.storage.sqlite.projects import create_project

    settings = Settings.from_env(data_dir=data_dir, public_url=public_url)
    with open_db(data_dir) as conn:
        project, ingest_key, read_token = create_project(
            conn, name, domain=domain, timezone=timezone, retention_days=retention_days,
            allowed_origins=allowed_origins,
        )
    tag = settings.script_tag(ingest_key)
    emit(as_json, {**project.as_dict(), "ingest_key": ingest_key, "read_token": read_token, "script_tag": tag}, "\n".join([
        f"created project {project.id} ({project.name})",
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
    from pulse.storage.sqlite.projects import list_projects

    with open_db(data_dir) as conn:
        found = list_projects(conn)
    rows = [(p.id, p.name, p.domain or "-", p.timezone, p.retention_days, iso(p.created_at)) for p in found]
    text = table(rows, ["id", "name", "domain", "timezone", "retention", "created"]) if found else "no projects"
    emit(as_json, {"projects": [p.as_dict() for p in found]}, text)


@projects.command("show")
@click.argument("project")
@data_dir_option
@json_option
@handle_errors
def projects_show(project: str, data_dir: Path, as_json: bool) -> None:
    """Show one project (by id or name) and its keys."""
    found, keys = project_keys(data_dir, project)
    lines = [f"{k}: {v}" for k, v in found.as_dict().items()]
    lines.append(keys_table(keys))
    emit(as_json, {**found.as_dict(), "keys": keys}, "\n".join(lines))


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
    from pulse.storage.sqlite.projects import get_project, update_project

    with open_db(data_dir) as conn:
        found = update_project(conn, get_project(conn, project), name=name, domain=domain, timezone=timezone,
                               retention_days=retention_days, allowed_origins=allowed_origins)
    emit(as_json, found.as_dict(), f"updated project {found.id} ({found.name})")


@projects.command("delete")
@click.argument("project")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@data_dir_option
@json_option
@handle_errors
def projects_delete(project: str, yes: bool, data_dir: Path, as_json: bool) -> None:
    """Delete a project, its keys and all its data."""
    from pulse.storage.sqlite.projects import delete_project, get_project

    with open_db(data_dir) as conn:
        found = get_project(conn, project)
        if not yes:
            if not sys.stdin.isatty():
                fail("refusing to delete without --yes (no terminal to confirm on)")
            click.confirm(f"delete project {found.id} ({found.name}) and all its events?", abort=True)
        delete_project(conn, found)
    emit(as_json, {"deleted": found.id, "name": found.name}, f"deleted project {found.id} ({found.name})")


# -- keys ----------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Rotate and list ingest keys and read tokens."""


@keys.command("rotate")
@click.argument("project")
@click.option("--ingest", "kind", flag_value="ingest", help="Rotate the ingest key (pk_…).")
@click.option("--read", "kind", flag_value="read", help="Rotate the read token (sk_…).")
@click.option("--grace", default=0, show_default=True, type=click.IntRange(0),
              help="Seconds the old key keeps working.")
@data_dir_option
@json_option
@handle_errors
def keys_rotate(project: str, kind: str | None, grace: int, data_dir: Path, as_json: bool) -> None:
    """Make a new key; the old one stops working at once (or after --grace seconds)."""
    from pulse.storage.sqlite.projects import get_project, rotate_key

    if kind is None:
        fail("say which key to rotate: --ingest or --read")
    with open_db(data_dir) as conn:
        found = get_project(conn, project)
        secret = rotate_key(conn, found, kind, grace_seconds=grace)
    field = "ingest_key" if kind == "ingest" else "read_token"
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
    found, keys_found = project_keys(data_dir, project)
    emit(as_json, {"project": found.id, "keys": keys_found}, keys_table(keys_found))


from pulse import cli_ops  # noqa: E402,F401  registers status, verify, prune, backup, export

if __name__ == "__main__":
    from pulse.cli import main as entry  # the package's module, on which cli_ops registered its commands

    entry()
