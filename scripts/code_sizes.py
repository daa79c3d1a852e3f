"""Line counts per package, the largest modules and functions, and those over the limits (350 and 60 lines).

python scripts/code_sizes.py [TREE] [PACKAGES]   # defaults: this checkout; service,kernel,serving,training
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path


def main(root: Path, packages: list[str]) -> None:
    lines: collections.Counter = collections.Counter()
    modules: dict[str, int] = {}
    functions: list[tuple[int, str]] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            name = str(path.relative_to(root))
            modules[name] = len(text.splitlines())
            lines[package] += modules[name]
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    print("lines per package:", dict(lines), "total", sum(lines.values()))
    print("largest modules:", sorted(((n, m) for m, n in modules.items()), reverse=True)[:5])
    print("five largest functions:", *(f"{n} {name}" for n, name in sorted(functions, reverse=True)[:5]), sep="\n  ")
    print(
        "functions over 60 lines:",
        sum(n > 60 for n, _ in functions),
        "; modules over 350:",
        sum(n > 350 for n in modules.values()),
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]) if args else Path(__file__).resolve().parent.parent,
         (args[1] if len(args) > 1 else "service,kernel,serving,training").split(","))  # fmt: skip
