"""What every `pulse` command shares: its settings and options, its output, one-line errors and exit codes, and
the one way it asks the store something (commands are synchronous, the store is asynchronous)."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from pulse.config import Settings
from pulse.storage.base import Store, open_store
from pulse.storage.model import ProjectError, SchemaTooNew
from pulse.timebounds import BadBound

EXIT_ERROR = 1  # the request cannot be done (not found, invalid value, already running)

# the defaults options show; PULSE_* variables and flags override them (Settings.from_env)
DEFAULTS = Settings()

T = TypeVar("T")


def _remember_store(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["pulse.store"] = value


def data_dir_option(fn: Callable) -> Callable:
    """--data-dir, and --store beside it (every command that opens the store takes both; settings_for reads it)."""
    fn = click.option(
        "--store", default=None, envvar="PULSE_STORE", expose_value=False, callback=_remember_store,
        metavar="URL", help="Where events are kept: clickhouse://HOST:8123/DB[?cluster=NAME]; default the SQLite"
                            " database in --data-dir (env PULSE_STORE).",
    )(fn)
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="PULSE_DATA_DIR",
        default=DEFAULTS.data_dir,
        show_default=True,
        help="Directory holding the database (env PULSE_DATA_DIR).",
    )(fn)


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")(fn)


def settings_for(data_dir: Path, **flags: object) -> Settings:
    """The settings a command runs with: defaults, PULSE_* variables, then its flags (None: not given)."""
    context = click.get_current_context(silent=True)
    store = context.meta.get("pulse.store") if context is not None else None
    return Settings.from_env(data_dir=data_dir, store=store, **flags)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn known failures into one clear line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BadBound as exc:  # a --from/--to value
            fail(f"--{exc}")
        except (ProjectError, SchemaTooNew, ValueError) as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))

    return wrapper


def ask_store(settings: Settings, question: Callable[[Store], Awaitable[T]], *, existing: bool = False) -> T:
    """`question(store)` on the store of `settings`, opened for it alone and without a writer (a running
    server's writer carries on beside it). With `existing`, a command that only reads or copies what is
    stored refuses a data directory without a database rather than create an empty one there."""
    if existing and not settings.store and not settings.db_path.exists():
        fail(f"no database at {settings.db_path}; is --data-dir right?")

    async def call() -> T:
        async with open_store(settings, serve=False) as store:
            return await question(store)

    return asyncio.run(call())


def emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(payload) if as_json else text)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
