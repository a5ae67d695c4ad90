"""The tree's architecture as checks: arrows run one way and the installed package list is the tree.

commands -> objectives / runtime -> model -> data; ``data/`` imports nothing from ``train/`` and no
two modules import each other (lazy imports inside functions count too: a cycle there is still a
cycle a reader has to untangle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"train": "vlmtune.train", "data": "vlmtune.data", "configs": "vlmtune.configs"}
# room -> rooms it must never import
FORBIDDEN = {
    "data": ("vlmtune.train",),
    "vlmtune.train.model": ("vlmtune.train.objectives", "vlmtune.train.runtime", "vlmtune.train.commands"),
    "vlmtune.train.objectives": ("vlmtune.train.commands",),
    "vlmtune.train.runtime": ("vlmtune.train.commands",),
}


def module_files() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((name, *parts))] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """vlmtune modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {mod: imports_of(path, set(files)) - {mod} for mod, path in files.items()}


def test_no_module_imports_from_a_room_above_it(graph):
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        for room, banned in FORBIDDEN.items()
        if mod.startswith(room if room != "data" else "vlmtune.data")
        for dep in deps
        if dep.startswith(banned)
    ]
    assert not wrong, wrong


def test_no_import_cycles(graph):
    """Depth-first search for a back edge; packages' __init__ (imported by their children) excluded."""
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_installed_packages_are_the_package_folders():
    """A new sub-package missing from pyproject's list would import in an editable install and be
    absent from a wheel."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {v: k for k, v in PACKAGE_DIRS.items()}
    folders = {
        ".".join((PACKAGE_DIRS[folder], *init.parent.relative_to(REPO / folder).parts))
        for folder in PACKAGE_DIRS
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == folders


def test_train_holds_only_the_rooms():
    loose = sorted(p.name for p in (REPO / "train").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside commands/, model/, objectives/, runtime/, demo/: {loose}"
