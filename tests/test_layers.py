"""Import hygiene: only storage imports apsw; server and storage never import Textual."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(output.split())


@pytest.mark.parametrize("module", ["pulse.server.app", "pulse.storage.sqlite.writer", "pulse.storage.sqlite.periods",
                                    "pulse.storage.sqlite.breakdowns", "pulse.storage.sqlite.lists", "pulse.cli"])
def test_server_storage_and_cli_do_not_import_textual(module):
    assert not any(name == "textual" or name.startswith("textual.") for name in imported_after(module))


@pytest.mark.parametrize("module", ["pulse.protocol", "pulse.config", "pulse.enrich", "pulse.storage.model"])
def test_shared_modules_import_no_database(module):
    loaded = imported_after(module)
    assert "apsw" not in loaded and "aiosqlite" not in loaded


def test_only_storage_imports_apsw():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "pulse"
    offenders = [
        str(path.relative_to(root)) for path in root.rglob("*.py")
        if "import apsw" in path.read_text() and path.relative_to(root).parts[0] != "storage"
    ]
    assert offenders == []


@pytest.mark.parametrize("module", ["pulse.tui.app", "pulse.tui.client"])
def test_tui_never_imports_the_database_or_the_server(module):
    loaded = imported_after(module)
    assert "apsw" not in loaded and "aiosqlite" not in loaded
    assert not any(name.startswith(("pulse.storage", "pulse.server")) for name in loaded)


@pytest.mark.parametrize("module", ["pulse.tui.client", "pulse.tui.state"])
def test_tui_client_and_state_do_not_import_textual(module):
    assert not any(name == "textual" or name.startswith("textual.") for name in imported_after(module))
