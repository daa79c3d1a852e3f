"""Import cycles among the project's modules, imports inside functions included (grimp), for a review.

    python scripts/import_cycles.py [TREE] [PACKAGES]   # defaults: this checkout; service,kernel,serving,training

Prints the strongly connected groups of modules (each is a cycle) and the imports between serving and training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp


def strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of two or more modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return groups


def import_edges(packages: str) -> dict[str, list[str]]:
    """Each module of `packages` (comma-separated) and the modules it imports, anywhere in its code."""
    graph = grimp.build_graph(*packages.split(","), cache_dir=None)
    return {module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def main(tree: str, packages: str) -> None:
    sys.path.insert(0, tree)
    edges = import_edges(packages)
    print(f"{len(edges)} modules; cycles:", strongly_connected(edges) or "none")
    halves = {"serving", "training"}
    crossing = [(a, b) for a in sorted(edges) for b in edges[a] if {a.split(".")[0], b.split(".")[0]} == halves]
    print(f"serving <-> training imports: {len(crossing)}", crossing)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else str(Path(__file__).resolve().parent.parent),
         args[1] if len(args) > 1 else "service,kernel,serving,training")  # fmt: skip
