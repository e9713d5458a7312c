"""Operations commands of `pulse`: status, verify, prune, backup, export. Each works while the server runs."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from pulse.cli import data_dir_option, emit, fail, handle_errors, iso, json_option, main, open_db
from pulse.config import DB_FILENAME, SERVER_FILENAME

EXIT_NOT_RUNNING = 3  # `pulse status`: no server on this data directory
EXIT_DIFFERENCES = 1  # `pulse verify`: aggregates disagree with raw events


@contextmanager
def read_db(data_dir: Path):
    from pulse.storage.sqlite.connection import connect

    path = data_dir / DB_FILENAME
    if not path.exists():
        fail(f"no database at {path}; is --data-dir right?")
    conn = connect(path, readonly=True)
    try:
        yield conn
    finally:
        conn.close()


def _health(data_dir: Path) -> tuple[dict[str, Any] | None, str]:
    path = data_dir / SERVER_FILENAME
    try:
        server = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"not running (no {path})"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    try:
        with urllib.request.urlopen(f"{server['url']}/health", timeout=3) as response:
            return {**json.loads(response.read()), "url": server["url"], "pid": server.get("pid")}, "up"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, f"not answering at {server.get('url')} (pid {server.get('pid')}): {exc}"


@main.command()
@data_dir_option
@json_option
@handle_errors
def status(data_dir: Path, as_json: bool) -> None:
    """Is the server up; its queue, writer lag and last commit; events today; database size.

    Exits 3 when no server answers for this data directory.
    """
    from pulse.storage.sqlite.maintenance import database_size, events_since
    from pulse.storage.sqlite.projects import list_projects

    health, state = _health(data_dir)
    today: dict[str, int] = {}
    with read_db(data_dir) as conn:
        for project in list_projects(conn):
            midnight = datetime.combine(datetime.now(ZoneInfo(project.timezone)).date(), datetime.min.time(),
                                        tzinfo=ZoneInfo(project.timezone))
            today[project.name] = events_since(conn, project.id, int(midnight.timestamp() * 1000))
    size = database_size(data_dir / DB_FILENAME)
    payload: dict[str, Any] = {"server": state, "database_bytes": size, "events_today": today}
    lines = [f"server      {state}" + (f" at {health['url']} (pid {health['pid']})" if health else "")]
    if health is not None:
        last = health.get("last_commit_at")
        payload.update({"url": health["url"], "pid": health["pid"], "queued_events": health["queued_events"],
                        "writer_lag_seconds": health["writer_lag_seconds"], "last_commit_at": last,
                        "events_written_since_start": health["events_written"]})
        ago = f"{time.time() - last:.1f} s ago" if last else "none since start"
        lines += [f"queue       {health['queued_events']:,} events waiting",
                  f"writer lag  {health['writer_lag_seconds']:.3f} s",
                  f"last commit {ago}"]
    lines.append(f"database    {size / 1_048_576:,.1f} MiB ({data_dir / DB_FILENAME})")
    lines.append("events today " + (", ".join(f"{name}: {n:,}" for name, n in today.items()) or "(no projects)"))
    emit(as_json, payload, "\n".join(lines))
    if health is None:
        sys.exit(EXIT_NOT_RUNNING)


@main.command()
@click.argument("project", required=False)
@data_dir_option
@json_option
@handle_errors
def verify(project: str | None, data_dir: Path, as_json: bool) -> None:
    """Recount rollups, sessions and persons from raw events; list every difference (exit 1 if any)."""
    from pulse.storage.sqlite.maintenance import verify as recount
    from pulse.storage.sqlite.projects import get_project

    with read_db(data_dir) as conn:
        chosen = [get_project(conn, project)] if project else None
        started = time.monotonic()
        found = recount(conn, chosen)
        seconds = time.monotonic() - started
    payload = {"differences": len(found), "seconds": round(seconds, 2),
               "details": [str(d) for d in found[:1000]]}
    shown = [str(d) for d in found[:50]] + ([f"… and {len(found) - 50} more"] if len(found) > 50 else [])
    text = "\n".join(shown + [f"{len(found)} differences ({seconds:.1f} s)"]) if found else \
        f"ok: rollups, sessions and persons agree with the raw events ({seconds:.1f} s)"
    emit(as_json, payload, text)
    if found:
        sys.exit(EXIT_DIFFERENCES)


@main.command()
@data_dir_option
@json_option
@handle_errors
def prune(data_dir: Path, as_json: bool) -> None:
    """Delete raw events older than each project's retention; aggregates stay. Safe while serving."""
    from pulse.storage.sqlite.maintenance import prune as delete_old

    with open_db(data_dir) as conn:
        deleted = delete_old(conn, time.time_ns() // 1_000_000)
    emit(as_json, {"deleted": deleted},
         "\n".join(f"{name}: {n:,} raw events deleted" for name, n in deleted.items()) or "no projects")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@data_dir_option
@json_option
@handle_errors
def backup(path: Path, data_dir: Path, as_json: bool) -> None:
    """An online, consistent copy of the live database at PATH (a file, or a directory to put one in)."""
    from pulse.storage.sqlite.maintenance import backup as copy

    source = data_dir / DB_FILENAME
    if not source.exists():
        fail(f"no database at {source}; is --data-dir right?")
    started = time.monotonic()
    size = copy(source, path)
    emit(as_json, {"path": str(path), "bytes": size, "seconds": round(time.monotonic() - started, 2)},
         f"backed up {size / 1_048_576:,.1f} MiB to {path}")


def _bound(name: str, raw: str | None, timezone: str, *, end: bool) -> int | None:
    """A --from/--to value read as the read API reads from/to (dates are whole days in the zone)."""
    from pulse.server.errors import ApiError
    from pulse.server.params import parse_bound

    if raw is None:
        return None
    try:
        return parse_bound(name, raw, ZoneInfo(timezone), end=end)
    except ApiError as exc:
        fail(f"--{exc.message}")
    return None


@main.command()
@click.argument("project")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="jsonl", show_default=True)
@click.option("--from", "start", default=None, help="First day or time (project's time zone); default: all.")
@click.option("--to", "end", default=None, help="Last day (included) or end time; default: now.")
@click.option("--output", "-o", type=click.Path(allow_dash=True, path_type=Path), default="-", help="File; - for stdout.")
@data_dir_option
@handle_errors
def export(project: str, fmt: str, start: str | None, end: str | None, output: Path, data_dir: Path) -> None:
    """Stream a project's raw events, oldest first, as CSV or JSON lines (never all in memory)."""
    from pulse.storage.sqlite.maintenance import export as write_events
    from pulse.storage.sqlite.projects import get_project

    with read_db(data_dir) as conn:
        found = get_project(conn, project)
        start_ms = _bound("from", start, found.timezone, end=False) or 0
        end_ms = _bound("to", end, found.timezone, end=True) or time.time_ns() // 1_000_000 + 1
        if end_ms <= start_ms:
            fail("--to: must be after --from")
        if str(output) == "-":
            count = write_events(conn, found.id, start_ms, end_ms, fmt, sys.stdout)
        else:
            with open(output, "w", encoding="utf-8", newline="") as out:
                count = write_events(conn, found.id, start_ms, end_ms, fmt, out)
    click.echo(f"exported {count:,} events of {found.name} ({iso(start_ms) or 'start'} – {iso(end_ms)})", err=True)

