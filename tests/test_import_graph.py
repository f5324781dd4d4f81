"""The package's import graph: no cycles between modules, and no arrow from a lower layer
to a higher one (losses never import experiment, the registry never imports the runner).

Every ``import`` counts, also those inside functions, and the registry's plugin modules,
which it imports by name."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

from pml_plugins import registry

PACKAGE = Path(__file__).resolve().parents[1] / "pml_plugins"

#: each top-level part of the package and its layer: an arrow goes to a lower layer only
LAYERS = {
    "geometry": 0,
    "losses": 1,
    "miners": 1,
    "samplers": 1,
    "models": 1,
    "trainers": 2,
    "registry": 3,
    "pml_plugins": 4,  # the package's __init__: the registry's names
    "experiment": 5,
    "cli": 6,
}


def module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(module: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports (the longest known prefix of each)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names]
    if module == "pml_plugins.registry":
        names += list(registry.PLUGIN_MODULES.values())
    out = set()
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != module:
            out.add(name)
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else parts[0]]


def upward_arrows(graph: Mapping[str, set[str]]) -> list[str]:
    return [
        f"{a} -> {b}"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if a.split(".")[:2] != b.split(".")[:2] and layer(b) >= layer(a)
    ]


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imported(m, path, files) for m, path in files.items()}


def test_every_part_of_the_package_has_a_layer(graph):
    assert {m.split(".")[1] if "." in m else m for m in graph} == set(LAYERS)
    # relative, absolute and by-name imports are all read
    assert "pml_plugins.losses.metrix_gram" in graph["pml_plugins.losses.metrix"]
    assert "pml_plugins.trainers" in graph["pml_plugins.registry"]
    assert "pml_plugins.registry" in graph["pml_plugins.experiment.config"]


def test_no_arrow_points_up(graph):
    assert upward_arrows(graph) == []


def test_no_cycles(graph):
    assert cycles(graph) == []


def test_the_checks_find_what_they_look_for():
    bad = {
        "pml_plugins.losses.nra": {"pml_plugins.experiment.run"},
        "pml_plugins.experiment.run": {"pml_plugins.experiment.config"},
        "pml_plugins.experiment.config": {"pml_plugins.experiment.run"},
    }
    assert upward_arrows(bad) == ["pml_plugins.losses.nra -> pml_plugins.experiment.run"]
    assert cycles(bad) == [["pml_plugins.experiment.config", "pml_plugins.experiment.run"]]
