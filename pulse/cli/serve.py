"""`pulse serve`: the server in the foreground, optionally with a demo project. The server is imported when it
runs, so that the other commands start without it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import click

from pulse.cli.common import DEFAULTS, ask_store, data_dir_option, fail, handle_errors, settings_for
from pulse.config import Settings
from pulse.storage.base import Store
from pulse.storage.model import INGEST, READ, Project, ProjectNotFound

DEMO_PROJECT = "demo"


@click.command()
@click.option("--host", default=DEFAULTS.host, show_default=True, envvar="PULSE_HOST", help="Address to listen on.")
@click.option("--port", default=DEFAULTS.port, show_default=True, type=click.IntRange(0, 65535), envvar="PULSE_PORT",
              help="Port to listen on.")
@data_dir_option
@click.option("--demo", is_flag=True, help=f"Create (or refresh) a project named '{DEMO_PROJECT}' and print its keys.")
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
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="info: one line per refused request; debug: every request"
                   f" (env PULSE_LOG_LEVEL; default: {DEFAULTS.log_level}).")
@handle_errors
def serve(host: str, port: int, data_dir: Path, demo: bool, ack: str | None, public_url: str | None,
          trust_proxy: bool | None, trusted_proxies: str | None, log_level: str | None) -> None:
    """Run the server: ingest, read API, live feed, SDK and demo page."""
    from pulse.server.app import AlreadyRunning, run

    settings = settings_for(data_dir, host=host, port=port, ack=ack, public_url=public_url,
                            trust_proxy=trust_proxy, trusted_proxies=trusted_proxies, log_level=log_level)
    seeder = None
    if demo:
        project, ingest_key, read_token, empty = ask_store(settings, _demo_project)
        _print_demo(settings, project, ingest_key, read_token)
        settings = dataclasses.replace(settings, demo_ingest_key=ingest_key)
        if empty:  # a week of traffic through the HTTP API, so the numbers are not all zero
            click.echo("  seeding 7 days of demo traffic in the background (scripts/seed_events.py)")
            seeder = subprocess.Popen(
                [sys.executable, "-m", "pulse.seed", "--url", f"http://{settings.host}:{settings.port}", "--key",
                 ingest_key, "--wait", "30"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
    try:
        run(settings, print_fn=lambda line: click.echo(line))
    except AlreadyRunning as exc:
        fail(str(exc))
    finally:
        if seeder is not None and seeder.poll() is None:
            seeder.terminate()


async def _demo_project(store: Store) -> tuple[Project, str, str, bool]:
    """The demo project with fresh keys (created if missing): it, its ingest key, its read token, and whether
    it has no events yet."""
    try:
        project = await store.get_project(DEMO_PROJECT)
        ingest_key = await store.rotate_key(project, INGEST)
        read_token = await store.rotate_key(project, READ)
    except ProjectNotFound:
        project, ingest_key, read_token = await store.create_project(DEMO_PROJECT)
    return project, ingest_key, read_token, await store.events_since(project.id, 0) == 0


def _print_demo(settings: Settings, project: Project, ingest_key: str, read_token: str) -> None:
    click.echo(f"demo project {project.id}")
    click.echo(f"  ingest key: {ingest_key}")
    click.echo(f"  read token: {read_token}")
    click.echo(f"  try: curl -X POST {settings.base_url}/api/v1/events/ingest -H 'X-API-Key: {ingest_key}' "
               """-d '{"events":[{"event":"page_view","distinct_id":"u1","page_url":"https://example.com/"}]}'""")
    click.echo(f"  then: curl -H 'Authorization: Bearer {read_token}' "
               f"{settings.base_url}/api/v1/projects/{project.id}/overview")
    click.echo(f"  demo page: {settings.base_url}/demo/")
