"""`pulse serve`: the server in the foreground, optionally with a demo project. The server is imported when it
runs, so that the other commands start without it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import click

from pulse.cli.common import DEFAULTS, ask_store, data_dir_option, fail, handle_errors, settings_for
from pulse.config import Settings
from pulse.files import FILE_MODE, make_private
from pulse.storage.base import Store
from pulse.storage.model import INGEST, READ, Project, ProjectNotFound, digest, now_ms

DEMO_PROJECT = "demo"
DEMO_KEYS_FILENAME = "demo.json"  # the demo project's keys, so that a restart prints (and accepts) the same ones
# the demo's traffic: the longest default view (30 days) and the 30 days it is compared with, and a day more so
# that the 24-hour and 7-day views of any hour find a whole period before them too
DEMO_DAYS = 61
DEMO_USERS = 12_200  # visitors over those days: 200 a day, about 2,200 events a day (as the 7-day seed had)


def _env_help() -> str:
    """Every setting as its PULSE_* variable and default: what `pulse serve --help` ends with."""
    lines = ["\b", "Environment (flags win over these; defaults in brackets):"]
    for field in dataclasses.fields(Settings):
        default = getattr(DEFAULTS, field.name)
        lines.append(f"  PULSE_{field.name.upper()} [{default if default != '' else 'none'}]")
    return "\n".join(lines)


@click.command(epilog=_env_help())
@click.option("--host", default=DEFAULTS.host, show_default=True, envvar="PULSE_HOST", help="Address to listen on.")
@click.option("--port", default=DEFAULTS.port, show_default=True, type=click.IntRange(0, 65535), envvar="PULSE_PORT",
              help="Port to listen on.")
@data_dir_option
@click.option("--demo", is_flag=True, help=f"Create a project named '{DEMO_PROJECT}' (if missing) and print its keys, the same at every"
                   f" start (kept in DATA_DIR/{DEMO_KEYS_FILENAME}).")
@click.option("--ack", type=click.Choice(["commit", "enqueue"]), default=None,
              help="Answer 202 after the commit (durable) or as soon as the batch is queued"
                   f" (env PULSE_ACK; default: {DEFAULTS.ack}).")
@click.option("--public-url", default=None, envvar="PULSE_PUBLIC_URL",
              help="Address sites use to reach this server, for the script tag.")
@click.option("--trust-proxy", is_flag=True, default=None,
              help="Take client IPs from Forwarded, X-Forwarded-For or X-Real-IP set by a trusted proxy.")
@click.option("--trusted-proxies", default=None, metavar="CIDRS",
              help="With --trust-proxy: the proxies' networks, comma-separated"
                   f" (env PULSE_TRUSTED_PROXIES; default: {DEFAULTS.trusted_proxies}).")
@click.option("--geoip", default=None, metavar="PATH|off",
              help="Visitors' countries from this MaxMind GeoLite2/GeoIP2 or DB-IP country database (.mmdb);"
                   " off: none (env PULSE_GEOIP; default: the data bundled with geoip2fast).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="info: one line per refused request; debug: every request"
                   f" (env PULSE_LOG_LEVEL; default: {DEFAULTS.log_level}).")
@handle_errors
def serve(host: str, port: int, data_dir: Path, demo: bool, ack: str | None, public_url: str | None,
          trust_proxy: bool | None, trusted_proxies: str | None, geoip: str | None, log_level: str | None) -> None:
    """Run the server: ingest, read API, live feed, SDK and demo page."""
    from pulse.server.app import AlreadyRunning, run
    from pulse.server.geo import GeoipUnavailable

    settings = settings_for(data_dir, host=host, port=port, ack=ack, public_url=public_url,
                            trust_proxy=trust_proxy, trusted_proxies=trusted_proxies, geoip=geoip,
                            log_level=log_level)
    seeder = None
    if demo:
        project, ingest_key, read_token, empty = ask_store(
            settings, lambda store: _demo_project(store, settings.data_dir / DEMO_KEYS_FILENAME))
        _print_demo(settings, project, ingest_key, read_token)
        settings = dataclasses.replace(settings, demo_ingest_key=ingest_key)
        if empty:  # two months of traffic through the HTTP API, so numbers and their comparisons are not empty
            click.echo(f"  seeding {DEMO_DAYS} days of demo traffic in the background (pulse.seed)")
            seeder = subprocess.Popen(
                [sys.executable, "-m", "pulse.seed", "--url", f"http://{settings.host}:{settings.port}", "--key",
                 ingest_key, "--days", str(DEMO_DAYS), "--users", str(DEMO_USERS), "--wait", "30", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            threading.Thread(target=_report_seeding, args=(seeder,), daemon=True).start()
    try:
        run(settings, print_fn=lambda line: click.echo(line))
    except (AlreadyRunning, GeoipUnavailable) as exc:
        fail(str(exc))
    finally:
        if seeder is not None and seeder.poll() is None:
            seeder.terminate()


async def _demo_project(store: Store, keys_path: Path) -> tuple[Project, str, str, bool]:
    """The demo project (created if missing): it, its ingest key, its read token, and whether it has no events yet.

    The keys are those of `keys_path` while they still open the project; otherwise they are made anew (rotated,
    or with the project) and written there, so a restart of `pulse serve --demo` keeps the keys already in use.
    """
    try:
        project = await store.get_project(DEMO_PROJECT)
    except ProjectNotFound:
        project, ingest_key, read_token = await store.create_project(DEMO_PROJECT)
    else:
        kept = _read_demo_keys(keys_path)
        grants = (await store.catalog()).grants
        now = now_ms()

        def works(kind: str, field: str) -> str | None:
            secret = kept.get(field) if kept.get("project") == project.id else None
            grant = grants.get(digest(secret)) if isinstance(secret, str) else None
            return secret if grant and grant.project_id == project.id and grant.kind == kind and grant.valid(now) \
                else None

        ingest_key = works(INGEST, "ingest_key") or await store.rotate_key(project, INGEST)
        read_token = works(READ, "read_token") or await store.rotate_key(project, READ)
    _write_demo_keys(keys_path, {"project": project.id, "ingest_key": ingest_key, "read_token": read_token})
    return project, ingest_key, read_token, await store.events_since(project.id, 0) == 0


def _read_demo_keys(path: Path) -> dict[str, object]:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _write_demo_keys(path: Path, keys: dict[str, object]) -> None:
    """The keys are secrets: the file is its owner's alone (made so if an older one was not)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as out:
        json.dump(keys, out)
    make_private(path)


def _report_seeding(seeder: subprocess.Popen) -> None:
    """One line when the background seeding ends: the events it sent, or that it did not finish."""
    out, _ = seeder.communicate()
    try:
        click.echo(f"demo traffic seeded: {json.loads(out)['events']:,} events")
    except (ValueError, KeyError, TypeError):
        click.echo(f"demo seeding stopped (exit {seeder.returncode})")


def _print_demo(settings: Settings, project: Project, ingest_key: str, read_token: str) -> None:
    click.echo(f"demo project {project.id}")
    click.echo(f"  ingest key: {ingest_key}")
    click.echo(f"  read token: {read_token}")
    click.echo(f"  try: curl -X POST {settings.base_url}/api/v1/events/ingest -H 'X-API-Key: {ingest_key}' "
               """-d '{"events":[{"event":"page_view","distinct_id":"u1","page_url":"https://example.com/"}]}'""")
    click.echo(f"  then: curl -H 'Authorization: Bearer {read_token}' "
               f"{settings.base_url}/api/v1/projects/{project.id}/overview")
    click.echo(f"  demo page: {settings.base_url}/demo/")
