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


# ---- calls flow down too: a block call never calls back up through a closure or a callback ------------------

def _reaches(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """{module: every module it imports, however indirectly}."""
    def visit(v, seen):
        for w in graph.get(v, ()):
            if w not in seen:
                seen.add(w)
                visit(w, seen)
        return seen

    return {v: visit(v, set()) for v in graph}


def calls_against_imports(run) -> tuple[set[tuple[str, str]], set[str]]:
    """(calls against the import direction, the package's modules entered) while ``run()`` runs.

    A call from module A into module B runs against the import direction when B imports A,
    however indirectly: a lower layer calling back into one above it (through a closure, a
    callback or an object handed down). The op registry calling the implementations registered
    with it is its job and left out; kernels run from Triton's frames, not ours."""
    import sys

    known = _modules("rga_triton")
    reaches = _reaches(import_graph("rga_triton"))
    by_path = {os.path.abspath(path): name for name, path in known.items()}
    names: dict[str, str | None] = {}
    against, entered = set(), set()

    def name(code):
        if code.co_filename not in names:
            names[code.co_filename] = by_path.get(os.path.abspath(code.co_filename))
        return names[code.co_filename]

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = name(frame.f_code)
        if callee is None:
            return
        entered.add(callee)
        caller_frame = frame.f_back
        caller = name(caller_frame.f_code) if caller_frame is not None else None
        if caller is None or caller == callee or caller == "rga_triton.ops.registry":
            return
        if caller in reaches.get(callee, ()):
            against.add((f"{caller}.{caller_frame.f_code.co_name}", f"{callee}.{frame.f_code.co_name}"))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return against, entered


def test_the_call_tracer_sees_a_callback():
    """A leaf (common/checks.py) calling a function of a module above it (module.py) is found."""
    def in_file(source, *parts):
        return eval(compile(source, os.path.join(ROOT, "rga_triton", *parts), "eval"))

    up = in_file("lambda: 0", "module.py")
    leaf = in_file("lambda f: f()", "common", "checks.py")
    against, entered = calls_against_imports(lambda: leaf(up))
    assert against == {("rga_triton.common.checks.<lambda>", "rga_triton.module.<lambda>")}
    assert entered == {"rga_triton.common.checks", "rga_triton.module"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="traces the Triton path "
                    "under Triton's interpreter (TRITON_INTERPRET=1, as the README's test command sets)")
@pytest.mark.parametrize("mode", ["eval no-grad", "train step"])
def test_a_block_call_runs_top_down(mode):
    """No call against the import direction on either route of the Triton path (issue 27)."""
    import torch

    import rga_triton

    block = rga_triton.RGAModule(16, 8 * 4, cha_ratio=4, spa_ratio=2, down_ratio=2, backend="triton")
    x = torch.randn(2, 16, 8, 4, requires_grad=mode == "train step")

    def run():
        if mode == "train step":
            block.train()(x).sum().backward()
        else:
            with torch.no_grad():
                block.eval()(x)

    run()                                   # first calls import and register what they need
    against, entered = calls_against_imports(run)
    assert not against, f"calls against the import direction: {sorted(against)}"
    # before issue 27 the same trace entered 17 files (eval) and 23 (train step)
    assert 0 < len(entered) <= {"eval no-grad": 17, "train step": 23}[mode], sorted(entered)
