"""Imports flow one way: no module of ``rga_triton/`` or ``bench/`` imports, however indirectly, a
module that imports it back. Module-level imports and imports inside functions both count (a lazy
import is still a dependency); a package's implicit import of its ``__init__`` does not."""
from __future__ import annotations

import ast
import os

import pytest
from paths import REPO_ROOT

ROOT = REPO_ROOT


def _modules(package: str) -> dict[str, str]:
    """{dotted module name: path} of every .py file under ``package`` (``__init__`` named as its package)."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _imports(module: str, path: str, known: dict[str, str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its file."""
    is_package = path.endswith("__init__.py")
    here = module.split(".") if is_package else module.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            stem = ".".join(base + (node.module.split(".") if node.module else []))
            # "from pkg import mod" imports pkg.mod; "from mod import name" imports mod
            names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:     # "rga_triton.ops.relation.op.gate_logit" -> its module
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph(*packages: str) -> dict[str, set[str]]:
    known = {}
    for package in packages:
        known.update(_modules(package))
    return {module: _imports(module, path, known) for module, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", ["rga_triton", "bench"])
def test_no_import_circle(package):
    circles = cycles(import_graph(package))
    assert not circles, f"import circles in {package}/: {circles}"


def test_the_detector_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph("rga_triton")
    assert "rga_triton.triton_path" in graph["rga_triton.dispatch"]          # imported inside run_triton
    assert "rga_triton.ops.relation.kernels" in graph["rga_triton.ops.relation.op"]    # from . import kernels
    assert "rga_triton.common.settings" in graph["rga_triton.launch.tuned"]            # from ..common.settings


def test_leaves_import_nothing_above_them():
    """common/ (settings, checks, BatchNorm semantics, layouts, the cost model) imports only common/."""
    graph = import_graph("rga_triton")
    for module, targets in graph.items():
        if module.startswith("rga_triton.common"):
            above = [t for t in targets if not t.startswith("rga_triton.common")]
            assert not above, f"{module} imports {above}"


def test_dispatch_imports_no_triton_at_module_level():
    tree = ast.parse(open(os.path.join(ROOT, "rga_triton", "dispatch.py")).read())
    top = [alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
           for alias in node.names] + [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert not [name for name in top if "triton" == name.split(".")[0] or name.startswith((".ops", ".launch"))]
