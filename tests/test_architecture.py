"""The package's import structure: no import cycles, and libraries import only downwards.

``improved_diffusion/`` (the core) sits under all of them and never imports ``medsegdiff``.
Every ``import`` of ``medsegdiff`` modules is read with :mod:`ast`, including the ones inside
functions (a delayed import hides a cycle from the interpreter, not from this test). The layer
order is the one in ARCHITECTURE.md ("Layers"); a module may import modules of its own layer or of
lower layers, never of a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medsegdiff"

# Lowest first. Same as ARCHITECTURE.md "Layers" (keep both in step).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("medsegdiff", "errors"),  # the package root (version) and the error types
    ("utils",),
    ("config",),
    ("data", "nets", "losses", "metrics", "tracking"),
    ("diffusion",),
    ("training", "inference", "evaluation", "baselines"),
    ("stages",),
    ("pipeline",),
    ("bench",),  # benchmarks time stages and whole pipelines (bench learn runs `run` per method)
    ("commands",),
    ("cli",),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """``{"medsegdiff.data.cache": path, ...}`` for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name refers to (``a.b.func`` -> ``a.b``), or None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """``(imported module, line)`` for every package import in ``path``, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "medsegdiff":
                continue
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                out.add((resolved, node.lineno))
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[tuple[str, int]]]:
    modules = module_files(package)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def layer(module: str) -> int:
    """Layer index of a module, from its sub-package (``medsegdiff.data.cache`` -> ``data``)."""
    parts = module.split(".")
    return LAYER_OF[parts[1] if len(parts) > 1 else parts[0]]


def find_cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_every_sub_package_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in module_files() if "." in m} - set(LAYER_OF))
    assert not unknown, f"add these sub-packages to LAYERS here and in ARCHITECTURE.md: {unknown}"


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (also through imports inside functions): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_libraries_import_only_downwards():
    upward = [
        f"{m}:{line} imports {t} (layer {LAYERS[layer(t)]} is above {LAYERS[layer(m)]})"
        for m, targets in sorted(import_graph().items())
        for t, line in sorted(targets)
        if layer(t) > layer(m)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_core_does_not_import_medsegdiff():
    core = PACKAGE.parent / "improved_diffusion"
    found = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "medsegdiff"]
    assert not found, "improved_diffusion/ is the layer under medsegdiff: " + "; ".join(found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "medsegdiff" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "medsegdiff"


def test_the_checks_see_cycles_hidden_in_functions_and_upward_imports(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/cache.py": "def f():\n    from medsegdiff.data.preprocess import g\n",
        "data/preprocess.py": "from medsegdiff.data import cache\n",
        "training/__init__.py": "",
        "training/trainer.py": "from .. import pipeline\n",
        "pipeline/__init__.py": "from medsegdiff.training import trainer\n",
    })
    graph = import_graph(pkg)
    assert graph["medsegdiff.data.cache"] == {("medsegdiff.data.preprocess", 2)}
    assert graph["medsegdiff.training.trainer"] == {("medsegdiff.pipeline", 1)}
    assert sorted(find_cycles(graph)) == [
        ["medsegdiff.data.cache", "medsegdiff.data.preprocess"],
        ["medsegdiff.pipeline", "medsegdiff.training.trainer"],
    ]
    assert layer("medsegdiff.training.trainer") < layer("medsegdiff.pipeline")


@pytest.mark.parametrize("module, expected", [
    ("medsegdiff", 0), ("medsegdiff.errors", 0), ("medsegdiff.data.cache", 3), ("medsegdiff.stages.train", 6),
    ("medsegdiff.cli", len(LAYERS) - 1),
])
def test_layer_of_a_module(module, expected):
    assert layer(module) == expected
