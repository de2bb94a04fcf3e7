#!/usr/bin/env python3
"""The import graph of attamba/ and pipeline/, read from the source with `ast` (nothing is imported).

Prints, for the tree under ROOT (default: this checkout):
- the circles between modules (files that import each other in a loop, imports inside functions included);
- the upward edges: imports from a part to a part on its own level or above, per `LEVELS` of
  tests/test_layout.py (read from the file given with --levels, default this checkout's);
- the counts, last, as `modules N  edges N  circles N  upward N`.

    python3 scripts/import_graph.py                      # this checkout
    python3 scripts/import_graph.py --root /tmp/old --levels tests/test_layout.py   # another tree, today's levels
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGES = ("attamba", "pipeline")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}


def _known(name: str, known: dict) -> str | None:
    """The longest known module that `name` is or lies in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The modules of the tree that module `name` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pipeline import schema` imports the module pipeline.schema
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in map(lambda t: _known(t, known), targets) if t and t != name)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def part(module: str) -> str:
    """pipeline.train.loop -> train; pipeline.schema -> schema; attamba.ops.ssd -> attamba.ops."""
    parts = module.split(".")
    if parts[0] == "pipeline":
        return parts[1] if len(parts) > 1 else "__init__"
    return ".".join(parts[:2])


def levels(layout: Path) -> dict[str, int]:
    for node in ast.parse(layout.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LEVELS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{layout} has no LEVELS table")


def upward(edges: dict[str, set[str]], level: dict[str, int]) -> list[tuple[str, str]]:
    """Imports from a part to another part whose level is not lower."""
    found = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = part(source), part(target)
            if a != b and level.get(b, 0) >= level.get(a, 0):
                found.append((source, target))
    return found


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=here)
    parser.add_argument("--levels", type=Path, default=here / "tests" / "test_layout.py")
    args = parser.parse_args()
    edges = graph(args.root)
    level = levels(args.levels)
    unknown = sorted({part(m) for m in edges} - set(level))
    found_circles, found_up = circles(edges), upward(edges, level)
    for component in found_circles:
        print("circle:", " <-> ".join(component))
    for source, target in found_up:
        print(f"upward: {source} -> {target}  (level {level.get(part(source), 0)} -> {level.get(part(target), 0)})")
    if unknown:
        print("parts without a level (taken as 0):", ", ".join(unknown))
    print(f"modules {len(edges)}  edges {sum(map(len, edges.values()))}  circles {len(found_circles)}  "
          f"upward {len(found_up)}")


if __name__ == "__main__":
    main()
