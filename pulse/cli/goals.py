"""`pulse goals`: the goals a project declares. A page-view path (`/thank-you`; `/blog/*` for every path under
`/blog/`) is a goal only once declared; a custom event name is one whether declared or not (declared, it is
listed even before it happens). Safe while the server runs: reads take the goals as they are at that moment."""

from __future__ import annotations

from pathlib import Path

import click

from pulse.cli.common import ask_store, data_dir_option, emit, handle_errors, iso, json_option, settings_for, table
from pulse.storage.base import Store


@click.group()
def goals() -> None:
    """Declare, list and remove a project's goals."""


@goals.command("add")
@click.argument("project")
@click.argument("goal")
@data_dir_option
@json_option
@handle_errors
def goals_add(project: str, goal: str, data_dir: Path, as_json: bool) -> None:
    """Declare GOAL: a path starting with / (a trailing * matches a prefix) or a custom event name."""
    async def question(store: Store) -> tuple[str, dict]:
        found = await store.get_project(project)
        return found.name, await store.add_goal(found, goal)

    name, added = ask_store(settings_for(data_dir), question)
    emit(as_json, {"project": name, **added}, f"added {added['kind']} goal {goal} to project {name}")


@goals.command("list")
@click.argument("project")
@data_dir_option
@json_option
@handle_errors
def goals_list(project: str, data_dir: Path, as_json: bool) -> None:
    """List a project's declared goals."""
    async def question(store: Store) -> tuple[str, list[dict]]:
        found = await store.get_project(project)
        return found.name, await store.list_goals(found)

    name, found = ask_store(settings_for(data_dir), question)
    rows = [(g["goal"], g["kind"], iso(g["created_at"])) for g in found]
    emit(as_json, {"project": name, "goals": found},
         table(rows, ["goal", "kind", "created"]) if found else f"no goals declared for project {name}")


@goals.command("remove")
@click.argument("project")
@click.argument("goal")
@data_dir_option
@json_option
@handle_errors
def goals_remove(project: str, goal: str, data_dir: Path, as_json: bool) -> None:
    """Remove a declared goal (its events stay; a custom event is still listed while it happens)."""
    async def question(store: Store) -> str:
        found = await store.get_project(project)
        await store.remove_goal(found, goal)
        return found.name

    name = ask_store(settings_for(data_dir), question)
    emit(as_json, {"project": name, "removed": goal}, f"removed goal {goal} from project {name}")
