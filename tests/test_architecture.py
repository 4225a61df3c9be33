"""The house rules, checked on the source: imports point one way and never in a cycle.

Layers (docs/architecture.md): errors <- config <- families <- models <- data/tasks <- train <-
tune/inference <- cli. Every import counts, including the lazy ones inside functions; a model
file that imports the data layer inside a function is as wrong as one that does it at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent / "megaray"

# top-level area -> areas it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "families": {"errors", "config"},
    "fs": {"errors"},
    "models": {"errors", "config", "families"},
    "weights": {"errors", "config", "families", "fs", "models"},
    "data": {"errors", "config", "fs", "models"},
    "tasks": {"errors", "config", "families", "fs", "models", "data", "weights"},
    "train": {"errors", "config", "families", "fs", "models", "data", "tasks", "weights"},
    "inference": {"errors", "config", "families", "fs", "models", "data", "tasks", "train", "weights"},
    "tune": {"errors", "config", "families", "fs", "models", "data", "tasks", "train", "weights"},
    "cli": {"errors", "config", "families", "fs", "models", "data", "tasks", "train", "inference", "tune", "weights"},
}


def _modules() -> Dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Set[str]:
    """megaray modules imported anywhere in ``path`` (``from pkg import mod`` counts as ``pkg.mod``)."""
    is_pkg = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("megaray"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if not base.startswith("megaray"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megaray"


def test_every_area_is_known():
    unknown = {_area(m) for m in MODULES} - set(ALLOWED) - {"megaray"}
    assert not unknown, f"new top-level area(s) {unknown}: add them to ALLOWED and docs/architecture.md"


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_imports_point_one_way(area):
    bad = []
    for mod, deps in GRAPH.items():
        if _area(mod) != area:
            continue
        for dep in deps:
            dep_area = _area(dep)
            if dep_area not in ALLOWED[area] | {area, "megaray"}:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


def test_config_is_a_leaf():
    assert GRAPH["megaray.config"] <= {"megaray.errors"}, GRAPH["megaray.config"]


def test_models_know_nothing_of_data_tasks_or_training():
    for mod, deps in GRAPH.items():
        if _area(mod) == "models":
            assert not {_area(d) for d in deps} & {"data", "tasks", "train", "tune", "inference", "cli"}, (mod, deps)


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import (lazy ones included)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack, on_stack, cycles = [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_lazy_imports(tmp_path):
    """The graph is not vacuous: a lazy import inside a function is found."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from megaray.config import RunConfig\n")
    MODULES.setdefault("megaray.zz_probe", p)
    try:
        assert "megaray.config" in _imports("megaray.zz_probe", p)
    finally:
        MODULES.pop("megaray.zz_probe")
