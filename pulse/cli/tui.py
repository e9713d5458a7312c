"""`pulse tui`: the terminal dashboard. Textual is imported when it runs, so that the other commands (and the
server) never load it."""

from __future__ import annotations

from pathlib import Path

import click

from pulse.cli.common import data_dir_option, fail


@click.command()
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
