"""Operations commands of `pulse`: status, verify, prune, backup, export. Each works while the server runs."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from pulse.cli.common import ask_store, data_dir_option, emit, fail, handle_errors, iso, json_option, settings_for
from pulse.config import SERVER_FILENAME
from pulse.files import DATA_DIR_MODE
from pulse.storage.base import Store
from pulse.storage.model import Difference
from pulse.timebounds import parse_bound

EXIT_NOT_RUNNING = 3  # `pulse status`: no server on this data directory
EXIT_DIFFERENCES = 1  # `pulse verify`: aggregates disagree with raw events


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


def _midnight_ms(timezone: str) -> int:
    """The start of today in the time zone, in epoch ms."""
    tz = ZoneInfo(timezone)
    return int(datetime.combine(datetime.now(tz).date(), datetime.min.time(), tzinfo=tz).timestamp() * 1000)


async def _events_today_and_size(store: Store) -> tuple[dict[str, int], int]:
    today = {project.name: await store.events_since(project.id, _midnight_ms(project.timezone))
             for project in await store.list_projects()}
    return today, await store.size_bytes()


@click.command()
@data_dir_option
@json_option
@handle_errors
def status(data_dir: Path, as_json: bool) -> None:
    """Is the server up; its queue, writer lag and last commit; events today; database size.

    Exits 3 when no server answers for this data directory.
    """
    settings = settings_for(data_dir)
    health, state = _health(settings.data_dir)
    today, size = ask_store(settings, _events_today_and_size, existing=True)
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
    lines.append(f"database    {size / 1_048_576:,.1f} MiB ({settings.db_path})")
    lines.append("events today " + (", ".join(f"{name}: {n:,}" for name, n in today.items()) or "(no projects)"))
    emit(as_json, payload, "\n".join(lines))
    if health is None:
        sys.exit(EXIT_NOT_RUNNING)


@click.command()
@click.argument("project", required=False)
@data_dir_option
@json_option
@handle_errors
def verify(project: str | None, data_dir: Path, as_json: bool) -> None:
    """Recount rollups, sessions and persons from raw events; list every difference (exit 1 if any)."""
    async def question(store: Store) -> tuple[list[Difference], float]:
        chosen = [await store.get_project(project)] if project else None
        started = time.monotonic()
        return await store.verify(chosen), time.monotonic() - started

    found, seconds = ask_store(settings_for(data_dir), question, existing=True)
    payload = {"differences": len(found), "seconds": round(seconds, 2),
               "details": [str(d) for d in found[:1000]]}
    shown = [str(d) for d in found[:50]] + ([f"… and {len(found) - 50} more"] if len(found) > 50 else [])
    text = "\n".join(shown + [f"{len(found)} differences ({seconds:.1f} s)"]) if found else \
        f"ok: rollups, sessions and persons agree with the raw events ({seconds:.1f} s)"
    emit(as_json, payload, text)
    if found:
        sys.exit(EXIT_DIFFERENCES)


@click.command()
@data_dir_option
@json_option
@handle_errors
def prune(data_dir: Path, as_json: bool) -> None:
    """Delete raw events older than each project's retention; aggregates stay. Safe while serving."""
    deleted = ask_store(settings_for(data_dir), lambda store: store.prune(time.time_ns() // 1_000_000))
    emit(as_json, {"deleted": deleted},
         "\n".join(f"{name}: {n:,} raw events deleted" for name, n in deleted.items()) or "no projects")


BACKUP_SUFFIX = ".db"  # a PATH that is not there yet names the file itself only with this suffix


@click.command()
@click.argument("path")
@data_dir_option
@json_option
@handle_errors
def backup(path: str, data_dir: Path, as_json: bool) -> None:
    """An online, consistent copy of the live database at PATH; prints the file written.

    PATH is a directory when it is one, ends with '/', or is not there yet and does not end with '.db': a
    directory not there yet is made, and the copy is put in it as pulse-YYYYMMDDTHHMMSSZ.db. Any other PATH
    is the file itself (replaced if it exists).
    """
    destination = Path(path)
    if path.endswith(("/", os.sep)) or (not destination.exists() and destination.suffix != BACKUP_SUFFIX):
        destination.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)

    async def question(store: Store) -> tuple[Path, int, float]:
        started = time.monotonic()
        written, size = await store.backup(destination)
        return written, size, time.monotonic() - started

    written, size, seconds = ask_store(settings_for(data_dir), question, existing=True)
    emit(as_json, {"path": str(written), "bytes": size, "seconds": round(seconds, 2)},
         f"backed up {size / 1_048_576:,.1f} MiB to {written}")


@click.command()
@click.argument("project")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="jsonl", show_default=True)
@click.option("--from", "start", default=None, help="First day or time (project's time zone); default: all.")
@click.option("--to", "end", default=None, help="Last day (included) or end time; default: now.")
@click.option("--output", "-o", type=click.Path(allow_dash=True, path_type=Path), default="-", help="File; - for stdout.")
@data_dir_option
@handle_errors
def export(project: str, fmt: str, start: str | None, end: str | None, output: Path, data_dir: Path) -> None:
    """Stream a project's raw events, oldest first, as CSV or JSON lines (never all in memory)."""
    settings = settings_for(data_dir)
    found = ask_store(settings, lambda store: store.get_project(project), existing=True)
    tz = ZoneInfo(found.timezone)  # --from/--to are read as the read API reads from/to
    start_ms = 0 if start is None else parse_bound("from", start, tz, end=False)
    end_ms = time.time_ns() // 1_000_000 + 1 if end is None else parse_bound("to", end, tz, end=True)
    if end_ms <= start_ms:
        fail("--to: must be after --from")
    if str(output) == "-":
        count = ask_store(settings, lambda store: store.export(found.id, start_ms, end_ms, fmt, sys.stdout))
    else:
        with open(output, "w", encoding="utf-8", newline="") as out:
            count = ask_store(settings, lambda store: store.export(found.id, start_ms, end_ms, fmt, out))
    click.echo(f"exported {count:,} events of {found.name} ({iso(start_ms)} – {iso(end_ms)})", err=True)
