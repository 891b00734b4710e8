"""Imports flow one way: core → models and data → stages → results → pipeline and bench → commands.

Every import counts, at module level or inside a function, under `TYPE_CHECKING` too: a lazy import
that only dodges a cycle is still a cycle. Read from the source with `ast`, nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import skdcgn

ROOT = Path(skdcgn.__file__).resolve().parent

# (layer, module-name prefixes); a module may import its own layer or any lower one
LAYERS = [
    (0, ["skdcgn._version", "skdcgn.errors", "skdcgn.io", "skdcgn.config", "skdcgn.images", "skdcgn.grids",
         "skdcgn.compose", "skdcgn.checkpoint", "skdcgn.hashing", "skdcgn.runlog", "skdcgn.training"]),
    (1, ["skdcgn.models", "skdcgn.data", "skdcgn.api"]),
    (2, ["skdcgn.distill", "skdcgn.counterfactuals", "skdcgn.imagenet_counterfactuals", "skdcgn.invariance",
         "skdcgn.teacher_training", "skdcgn.label_noise", "skdcgn.imagenet_classifier",
         "skdcgn.metrics", "skdcgn.multitrain"]),
    (3, ["skdcgn.results"]),
    (4, ["skdcgn.pipeline", "skdcgn.bench"]),
    (5, ["skdcgn.cli", "skdcgn.commands", "skdcgn._console", "skdcgn.__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The skdcgn modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        for t in targets:
            while t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name and t != "skdcgn":
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _layer(module: str) -> int | None:
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def test_every_module_has_a_layer():
    assert [m for m in _graph() if m != "skdcgn" and _layer(m) is None] == []


def test_imports_flow_one_way():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, deps in _graph().items() if a != "skdcgn" for b in deps if _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_source_free_and_models_apart_from_their_training():
    graph = _graph()
    # the distiller sees the teacher only through (u, y) -> output: it never reads real data
    assert [(a, b) for a, deps in graph.items() if a.startswith("skdcgn.distill") for b in deps
            if b.startswith("skdcgn.data")] == []
    # models never import the code that trains or evaluates them
    assert [(a, b) for a, deps in graph.items() if a.startswith("skdcgn.models") for b in deps
            if _layer(b) >= 2] == []


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                   "def f():\n    from .c import y\n")
    assert _imports("pkg.m", mod, {"pkg.m": mod, "pkg.b": mod, "pkg.c": mod}) == {"pkg.b", "pkg.c"}
