"""The package's shape: no import cycles, imports pointing one way, settings a leaf.

Imports are read from the source (module level, inside functions and under
``TYPE_CHECKING`` alike), so a cycle hidden in a function body fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "wsi_assist"

#: Layers, lowest first: a module may import its own layer and those below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("settings", ("wsi_assist", "settings", "errors")),
    ("I/O", ("files", "geojson", "slide", "chunks", "lowres", "synthetic", "locks",
             "progress")),
    ("computation", ("tissue", "tiling", "pieces", "stream", "qc", "thumbnail", "aggregate",
                     "represent", "stain", "channels", "nuclei", "nuclei_morph",
                     "nuclei_fluorescence", "models")),
    ("store", ("store",)),
    ("findings and reports", ("caption", "summary", "report")),
    ("stages", ("stages",)),
    ("batch", ("batch", "config")),
    ("cli", ("cli", "__main__")),
]


def _name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (the named submodule, not its parent)."""
    paths = {_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in paths}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in paths:
                        deps.add(full)
                    elif base in paths:
                        deps.add(base)
        graph[mod] = deps - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(mod: str) -> int:
    rel = mod.removeprefix("wsi_assist.") if mod != "wsi_assist" else "wsi_assist"
    head = rel.split(".")[0]
    for rank, (_, names) in enumerate(LAYERS):
        if head in names:
            return rank
    raise AssertionError(f"module {mod!r} is in no layer of tests/test_architecture.py; "
                         "add it where its imports put it")


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_cycle_detection_finds_a_hidden_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_imports_point_one_way() -> None:
    wrong = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
             for m, deps in import_graph().items() for d in deps
             if layer_of(d) > layer_of(m)]
    assert wrong == []


def test_nuclei_is_plain_computation() -> None:
    """Nucleus detection works on arrays alone: no slide, tiles, store or models."""
    assert import_graph()["wsi_assist.nuclei"] <= {"wsi_assist.stain", "wsi_assist.settings",
                                                   "wsi_assist.errors",
                                                   "wsi_assist.nuclei_morph"}
    assert import_graph()["wsi_assist.nuclei_morph"] == set()


@pytest.mark.parametrize("leaf", ["wsi_assist.settings", "wsi_assist.errors",
                                  "wsi_assist.files"])
def test_leaves_import_nothing_of_the_package(leaf: str) -> None:
    assert import_graph()[leaf] == set()
