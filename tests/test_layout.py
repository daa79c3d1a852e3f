"""The layout ARCHITECTURE.md describes: no private name crosses a module, modules and functions stay small.

The import contracts themselves (who may import whom) are import-linter's, in `make lint`; it has no contract
for cycles, so the test below finds them (grimp, the graph import-linter builds, imports inside functions
included).
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

PACKAGES = ("service", "kernel", "serving", "training")
FOLDERS = (*PACKAGES, "tests", "scripts")
PROJECT = (*FOLDERS, "wsgi")
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
# Issue 14's one exception to the function limit: a benchmark script's report table (rows of markdown, read in
# order). Named one by one, as path::function.
LONG_REPORT_TABLES = {"scripts/bench_report.py::table"}


def python_files(*folders: str):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_private_name_is_imported_from_another_module():
    """If another module needs a name, it is public and named for what it is (`from x import _y` is not)."""
    crossings = []
    for path in [*python_files(*PROJECT), ROOT / "wsgi.py", ROOT / "gunicorn.conf.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
                private = [
                    alias.name for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
                crossings += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{name}" for name in private]
    assert crossings == []


def test_no_import_cycle_and_the_halves_never_import_each_other():
    """A cycle, even one kept importable by imports inside functions, means a module has no home: split it."""
    from scripts.import_cycles import import_edges, strongly_connected

    edges = import_edges(",".join(PACKAGES))
    assert "serving.views" in edges and "training.views" in edges  # the graph holds the tree, not an empty one
    assert strongly_connected(edges) == []
    halves = {"serving", "training"}
    assert [(a, b) for a in edges for b in edges[a] if {a.split(".")[0], b.split(".")[0]} == halves] == []


@pytest.mark.parametrize("package", FOLDERS)
def test_modules_and_functions_are_small(package):
    """No module over 350 lines and no function over 60 (the OpenAPI tables are split per half to keep so), in the
    four packages and in tests/ and scripts/. The one exemption (issue 14) is a benchmark script's report table, by
    name in LONG_REPORT_TABLES: its function may be longer; its module may not."""
    too_long = []
    for path in python_files(package):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{path.relative_to(ROOT)}::{node.name}" not in LONG_REPORT_TABLES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == []
