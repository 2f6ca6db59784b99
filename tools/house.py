"""The house in numbers: import circles, what the training library imports, the largest files.

    python tools/house.py            prints the report; exits 1 if a rule of the house is broken

Reads every module of the `minilora` package as text (ast; nothing is imported), with imports
inside functions counted like those at the top. An import circle is a set of modules that reach
each other through imports (a strongly connected component of more than one module).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minilora"
MAX_LINES = 450
EXPERIMENTS = "minilora.experiments"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports. `from pkg import sub` counts the submodule, not
    the package (a parent package is always loaded first, which makes no circle); a name from a
    package's __init__ counts the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                result.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return result


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [n for n in edges if n == start or n.startswith(start + ".")]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += edges.get(n, ())
    return seen


def report() -> dict:
    edges = graph()
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    largest = max(lines, key=lines.get)
    return {
        "modules": len(edges),
        "import circles": circles(edges),
        "experiments imported by minilora.train": sorted(n for n in reachable(edges, "minilora.train")
                                                         if n == EXPERIMENTS or n.startswith(EXPERIMENTS + ".")),
        "largest file": (str(modules()[largest].relative_to(ROOT)), lines[largest]),
        "files over the limit": sorted((str(modules()[n].relative_to(ROOT)), c) for n, c in lines.items() if c > MAX_LINES),
    }


def main() -> int:
    found = report()
    for key, value in found.items():
        print(f"{key}: {value}")
    broken = found["import circles"] or found["experiments imported by minilora.train"] or found["files over the limit"]
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
