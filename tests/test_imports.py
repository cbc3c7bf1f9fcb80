"""The package's import graph: no cycles among module-level imports, the data package a leaf
that nothing of training, explain or evaluation leaks into, and every module importable in
dependency order in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "src")
PACKAGE = "diffusers_mdit"


def modules() -> dict[str, str]:
    """Module name -> file of every module of the package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(SOURCE, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, SOURCE)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``top_level_only``: not counting imports
    inside functions). Imports of a module's own parent packages are left out: Python has
    already run them when the module is imported."""
    known = modules()
    graph = {}
    for module, path in known.items():
        tree = ast.parse(open(path).read())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        edges = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in known}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
                edges |= subs
                if base in known and len(subs) < len(node.names):
                    edges.add(base)
        graph[module] = {e for e in edges if not f"{module}.".startswith(f"{e}.")} - {module}
    return graph


def test_module_level_imports_have_no_cycles():
    try:
        order = list(TopologicalSorter(import_graph(top_level_only=True)).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from error
    assert len(order) == len(modules())


def test_the_data_package_depends_on_nothing_above_it():
    """Counting imports inside functions too: data is what training, explain and evaluation
    read, so it must not reach back into them (the old training.data <-> explain.mlp_probe
    cycle)."""
    above = ("training", "explain", "evaluation", "pipelines", "models", "hub", "cli", "demo")
    for module, edges in import_graph(top_level_only=False).items():
        if module.startswith(f"{PACKAGE}.data"):
            leaks = sorted(e for e in edges if e.split(".")[1] in above)
            assert not leaks, (module, leaks)


@pytest.mark.slow  # one fresh interpreter per module
def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    order = list(TopologicalSorter(import_graph(top_level_only=True)).static_order())
    order = [name for name in order if not name.endswith("__main__")]  # runs the demo
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *order],
        env={**os.environ, "PYTHONPATH": SOURCE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
