"""The import graph of `cascade_mega/`, from every import statement (inside functions too), and its
circles: `python tools/import_graph.py` prints them (none: exit 0).

An edge A -> B for each `import B` / `from B import x` in A's file (`from P import m` where m is a
module of package P is an edge to P.m); relative imports are resolved. A circle is a strongly
connected set of two or more modules (Tarjan's algorithm), printed as one cycle through it.
"""

from __future__ import annotations

import ast
import os
import sys


def modules(root: str, package: str = "cascade_mega") -> dict:
    """{module name: file} of every .py file of the package."""
    out = {}
    base = os.path.join(root, package)
    for folder, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def edges(root: str, package: str = "cascade_mega") -> dict:
    mods = modules(root, package)
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def circles(graph: dict) -> list:
    """Strongly connected components of two or more modules (Tarjan), sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else \
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = circles(edges(root))
    for comp in found:
        print("circle: " + " <-> ".join(comp))
    if not found:
        print("no import circles in cascade_mega/")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
