"""`pulse migrate --to clickhouse://…`: the SQLite database of --data-dir copied into the ClickHouse store, then
checked: per project the events, persons and sessions of both stores, and their overview over every event.

The copy itself is the ClickHouse store's (`pulse.storage.clickhouse.migrate`, the one place below the seam
the CLI reaches: it reads SQLite's rows and writes ClickHouse's); the check asks both stores through the seam.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import click

from pulse.cli.common import data_dir_option, emit, fail, handle_errors, json_option, settings_for
from pulse.config import Settings
from pulse.storage.base import open_store
from pulse.storage.model import HOUR_MS, Filters, Window

EXIT_DIFFERENT = 1  # the stores disagree after the copy
TARGET_SCHEMES = ("clickhouse://", "chdb://")


async def _migrate(source: Settings, target: Settings, batch: int) -> list[dict[str, Any]]:
    from pulse.storage.clickhouse.migrate import copy_sqlite, event_span

    written = [0]

    def progress(count: int) -> None:
        written[0] += count
        click.echo(f"\r{written[0]:,} events copied", err=True, nl=False)

    async with open_store(target, serve=False) as clickhouse:
        copied = await copy_sqlite(source.db_path, clickhouse, batch=batch, progress=progress)
        if written[0]:
            click.echo("", err=True)
        report = []
        async with open_store(source, serve=False) as sqlite:
            now = time.time_ns() // 1_000_000
            for found in copied:
                pid = found.project.id
                entry: dict[str, Any] = {
                    "project": found.project.name, "id": pid, "events_written": found.events_written,
                    "ids_written": found.ids_written, "catalog_written": found.catalog_written,
                    **{what: {"sqlite": a, "clickhouse": b} for what, (a, b) in found.counts.items()}}
                span = event_span(source.db_path, pid)
                if span is not None:
                    window = Window(span[0] // HOUR_MS * HOUR_MS, (span[1] // HOUR_MS + 1) * HOUR_MS)
                    mine = await sqlite.overview(pid, window, Filters(), now)
                    theirs = await clickhouse.overview(pid, window, Filters(), now)
                    entry["overview"] = {"sqlite": [mine.events, mine.unique_users, mine.sessions],
                                         "clickhouse": [theirs.events, theirs.unique_users, theirs.sessions],
                                         "equal": mine == theirs}
                report.append(entry)
    return report


def _agrees(entry: dict[str, Any]) -> bool:
    return (all(entry[what]["sqlite"] == entry[what]["clickhouse"] for what in ("events", "persons", "sessions"))
            and entry.get("overview", {"equal": True})["equal"])


@click.command()
@click.option("--to", "target", required=True, metavar="URL",
              help="The ClickHouse store: clickhouse://HOST:8123/DB[?cluster=NAME] (or chdb://PATH).")
@click.option("--batch", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True,
              help="Events per insert.")
@data_dir_option
@json_option
@handle_errors
def migrate(target: str, batch: int, data_dir: Path, as_json: bool) -> None:
    """Copy the SQLite database of --data-dir into a ClickHouse store, then compare the two.

    Projects (with their ids, keys, share links and goals), persons with their distinct ids, and events with
    their sessions are copied; ClickHouse computes its rollups from the events. Safe to run again: what the
    target holds already is skipped, so a second run copies what arrived since. A target that holds any other
    project is refused. Exits 1 when a project's events, persons, sessions or overview differ after the copy.
    """
    source = settings_for(data_dir)
    if source.store:
        fail("migrate copies the SQLite database of --data-dir; --store / PULSE_STORE must not be set")
    if not target.startswith(TARGET_SCHEMES):
        fail(f"--to: expected clickhouse://HOST:PORT/DB or chdb://PATH, got {target!r}")
    if not source.db_path.exists():
        fail(f"no database at {source.db_path}; is --data-dir right?")
    report = asyncio.run(_migrate(source, Settings.from_env(data_dir=data_dir, store=target), batch))
    lines = []
    for entry in report:
        overview = entry.get("overview")
        lines.append(
            f"{entry['project']} (id {entry['id']}): "
            + ", ".join(f"{what} {entry[what]['sqlite']:,} / {entry[what]['clickhouse']:,}"
                        for what in ("events", "persons", "sessions"))
            + ("" if overview is None else
               f"; overview {'equal' if overview['equal'] else 'DIFFERENT'}"
               f" (events, users, sessions {overview['sqlite']} / {overview['clickhouse']})")
            + f"; {entry['events_written']:,} events written")
    ok = all(_agrees(entry) for entry in report)
    lines.append("ok: both stores agree (SQLite / ClickHouse)" if ok else "the stores differ (SQLite / ClickHouse)")
    emit(as_json, {"projects": report, "ok": ok}, "\n".join(lines) if report else "no projects")
    if not ok:
        sys.exit(EXIT_DIFFERENT)
