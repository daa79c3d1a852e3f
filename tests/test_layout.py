"""The layout ARCHITECTURE.md describes: no private name crosses a module, modules and functions stay small.

The import contracts themselves (who may import whom) are import-linter's, in `make lint`.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

PACKAGES = ("service", "kernel", "serving", "training")
PROJECT = (*PACKAGES, "tests", "scripts", "wsgi")
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


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


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_functions_are_small(package):
    """No module over 350 lines and no function over 60 (the OpenAPI tables are split per half to keep so)."""
    too_long = []
    for path in python_files(package):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == []
