"""The package's import graph: no cycles, no imports inside functions, and the layers apart
(the reference never imports the engine, the engine never the reference)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastacd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> tuple[set[str], list[str]]:
    """(fastacd modules imported at module level, imports of fastacd modules inside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    edges: set[str] = set()
    in_functions: list[str] = []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = _resolve(module, node)
        out = []
        for a in node.names:
            sub = f"{base}.{a.name}"
            out.append(sub if sub in MODULES else base)
        return out

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only: nothing is imported at run time
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = [t for t in targets(child) if t == "fastacd" or t.startswith("fastacd.")]
                if in_function:
                    in_functions.extend(f"{module}: {t}" for t in found)
                else:
                    edges.update(found)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    # importing a.b.c first runs the packages above it (a.b), unless the importer is inside
    # them (then they are already running); the root package is the entry point, left out
    for t in list(edges):
        parts = t.split(".")
        for k in range(2, len(parts)):
            package = ".".join(parts[:k])
            if not module.startswith(package + ".") and module != package:
                edges.add(package)
    edges.discard(module)
    return {e for e in edges if e != "fastacd" or module == "fastacd"}, in_functions


GRAPH = {m: imports(m)[0] for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w is v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in GRAPH.get(m, ()):
            if n not in seen and n != "fastacd":
                seen.add(n)
                todo.append(n)
    return seen


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_no_fastacd_imports_inside_functions():
    inside = [f for m in MODULES for f in imports(m)[1]]
    assert inside == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("fastacd.reference")))
def test_reference_never_imports_the_engine(module):
    reached = _closure(module)
    assert not {m for m in reached if m.startswith("fastacd.engine")}, sorted(reached)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(("fastacd.engine", "fastacd.rules", "fastacd.capture"))))
def test_engine_rules_and_capture_never_import_the_reference(module):
    reached = _closure(module)
    assert not {m for m in reached if m.startswith("fastacd.reference")}, sorted(reached)


def test_rules_import_neither_engine_nor_hierarchies():
    for m in MODULES:
        if m.startswith("fastacd.rules"):
            bad = {r for r in _closure(m) if r.startswith(("fastacd.engine", "fastacd.image", "fastacd.text",
                                                             "fastacd.train", "fastacd.cli"))}
            assert not bad, (m, sorted(bad))


def test_import_fastacd_in_a_fresh_interpreter():
    """What the static graph says holds at run time: ``import fastacd`` imports cleanly and every
    public subpackage's module of the original's names is registered."""
    code = ("import fastacd, sys; import fastacd.agg_2d, fastacd.score_funcs; "
            "from fastacd import agg_1d, tiling_1d, tiling_2d; "
            "print(sorted(m for m in sys.modules if m.startswith('fastacd.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "fastacd.engine.decomposer" in out.stdout
