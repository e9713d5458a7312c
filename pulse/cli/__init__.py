"""The `pulse` command: a thin Click layer over the store (`pulse.storage.base`), the server and the TUI.

One module per family of commands, each built on `common` (options, output, errors, asking the store) and
registered here: serve, tui, projects and keys, goals, share links, and the operations (status, verify, prune, backup, export, migrate).
The server and the TUI are imported only by the commands that run them.
"""

from __future__ import annotations

import click

from pulse.cli import goals, migrate, ops, projects, serve, share, tui


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pulse")
def main() -> None:
    """pulse: self-hosted event analytics in one process."""


for command in (serve.serve, tui.tui, projects.projects, projects.keys, goals.goals, share.share,
                ops.status, ops.verify, ops.prune, ops.backup, ops.export, migrate.migrate):
    main.add_command(command)
