"""The package's layers: every module's imports (function-local ones too) read with `ast`; a
module imports only from its own layer or the ones below, no modules import each other in a
circle, and the package root holds at most 10 modules.

The layers, lowest first (README.md, "Layout"):
0 the root (config, errors, identity, distributed, console); 1 speed/ (process and kernel
tricks); 2 data/, models/; 3 retrieval/, export/ (formats and MLflow models); 4 tasks/;
5 study/ (pure statistics); 6 tracking/ (MLflow runs and what is read back); 7 training/;
8 report/; 9 app/ (entry points' logic, modes, launchers, sweeps, tuning).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "finetune_budget"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE
MAX_ROOT_MODULES = 10

LAYERS = {
    PACKAGE: 0,  # __init__.py: the version
    f"{PACKAGE}.config": 0,
    f"{PACKAGE}.errors": 0,
    f"{PACKAGE}.identity": 0,
    f"{PACKAGE}.distributed": 0,
    f"{PACKAGE}.console": 0,
    f"{PACKAGE}.speed": 1,
    f"{PACKAGE}.data": 2,
    f"{PACKAGE}.models": 2,
    f"{PACKAGE}.retrieval": 3,
    f"{PACKAGE}.export": 3,
    f"{PACKAGE}.tasks": 4,
    f"{PACKAGE}.study": 5,
    f"{PACKAGE}.tracking": 6,
    f"{PACKAGE}.training": 7,
    f"{PACKAGE}.report": 8,
    f"{PACKAGE}.app": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (a name imported from a
    package counts as its submodule when there is one, else as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` names a module or a name
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE):
                found.add(target)
    found.discard(name)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def layer(name: str) -> int:
    key = name
    while key not in LAYERS:
        if "." not in key:
            raise KeyError(name)
        key = key.rpartition(".")[0]
        if key == PACKAGE:  # a module in the root must be named in LAYERS itself
            raise KeyError(name)
    return LAYERS[key]


def test_every_module_has_a_layer():
    unplaced = []
    for name in MODULES:
        try:
            layer(name)
        except KeyError:
            unplaced.append(name)
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as the path of modules around it, or None (depth-first)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_package_root_holds_at_most_ten_modules():
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from finetune_budget.app.cli import guarded_job\n", {f"{PACKAGE}.app.cli"}),
        ("def f():\n    from finetune_budget.speed import reuse\n", {f"{PACKAGE}.speed.reuse"}),
        ("import finetune_budget.models.unpadded as u\n", {f"{PACKAGE}.models.unpadded"}),
        ("from . import html\n", {f"{PACKAGE}.report.html"}),
        ("from finetune_budget import __version__\n", {PACKAGE}),
    ],
)
def test_imports_are_read_from_every_form(tmp_path, source, expected):
    """The checks above see a function-local import, an `import a.b as c` and a relative one
    (what an upward import would hide behind)."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imported(f"{PACKAGE}.report.probe", path) == expected


def test_an_upward_import_or_a_cycle_is_found():
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph[f"{PACKAGE}.study.roi"].add(f"{PACKAGE}.tracking.query")  # study importing tracking
    assert layer(f"{PACKAGE}.tracking.query") > layer(f"{PACKAGE}.study.roi")
    assert find_cycle(graph) is not None  # tracking.query imports study.roi
