"""Import hygiene: only storage imports apsw; server and storage never import Textual; no import cycle among
pulse's modules; the server, the TUI and the CLI reach storage only through the seam (base, model)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PULSE = pathlib.Path(__file__).resolve().parent.parent / "pulse"
SEAM = {"pulse.storage.base", "pulse.storage.model"}
# `pulse migrate` copies one store's rows into another's: its copy is the one module below the seam it reaches
BELOW_SEAM = {"pulse.cli.migrate": {"pulse.storage.clickhouse.migrate"}}


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


def pulse_modules() -> dict[str, pathlib.Path]:
    """Every module under pulse/ by dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for path in PULSE.rglob("*.py"):
        parts = path.relative_to(PULSE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                                         or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> dict[str, bool]:
    """The pulse modules `name` imports, anywhere in it (top level, functions, classes), each with whether only
    for type checking (under `if TYPE_CHECKING:`). `from package import module` is an import of the module;
    relative imports are resolved against the importing module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, bool] = {}

    def add(target: str, typing_only: bool) -> None:
        if target != name:
            found[target] = found.get(target, True) and typing_only

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name in modules:
                        add(alias.name, typing_only)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    if f"{base}.{alias.name}" in modules:
                        add(f"{base}.{alias.name}", typing_only)
                    elif base in modules:
                        add(base, typing_only)
            if _type_checking(child):
                visit(ast.Module(body=child.body, type_ignores=[]), True)
                visit(ast.Module(body=child.orelse, type_ignores=[]), typing_only)
            else:
                visit(child, typing_only)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def import_graph() -> dict[str, dict[str, bool]]:
    modules = pulse_modules()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, without recursion: the sets of modules that each reach one another."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_no_import_cycle():
    """No module imports, by any path, a module that imports it back: every layer can be read, loaded and
    replaced from the bottom up. Imports made only for type checking never run and are left out.

    The single-module CLI registers its ops commands by importing cli_ops at its end, which imports the CLI
    back; that pair is tolerated only until the CLI is a package (pulse/cli/)."""
    graph = {name: {target for target, typing_only in targets.items() if not typing_only}
             for name, targets in import_graph().items()}
    cycles = [sorted(component) for component in strongly_connected(graph) if len(component) > 1]
    if not (PULSE / "cli").is_dir():
        cycles = [cycle for cycle in cycles if cycle != ["pulse.cli", "pulse.cli_ops"]]
    assert cycles == []


def cli_modules(modules: dict[str, pathlib.Path]) -> set[str]:
    return {name for name in modules if name in ("pulse.cli", "pulse.cli_ops") or name.startswith("pulse.cli.")}


@pytest.mark.parametrize("layer", ["pulse.server", "pulse.tui", "pulse.cli"])
def test_the_server_tui_and_cli_reach_storage_only_through_the_seam(layer):
    """`pulse.storage.base` and `pulse.storage.model` only, type-checking imports included: a second store is
    added below the seam without touching these."""
    if layer == "pulse.cli" and not (PULSE / "cli").is_dir():
        pytest.skip("the CLI package talks to the store")
    graph = import_graph()
    members = cli_modules(graph) if layer == "pulse.cli" else {
        name for name in graph if name == layer or name.startswith(layer + ".")}
    assert members
    below = {f"{name} imports {target}" for name in members for target in graph[name]
             if (target == "pulse.storage" or target.startswith("pulse.storage.")) and target not in SEAM
             and target not in BELOW_SEAM.get(name, ())}
    assert below == set()
