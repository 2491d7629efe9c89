"""docs/architecture.md kept true: no import circle anywhere in the package (every import statement
counts: module level, inside functions, and under TYPE_CHECKING), and each folder imports only the
folders its row in the table allows."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"glm_mlx": "glm_mlx", "cli": "glm_mlx.cli", "quantize": "glm_mlx.quantize"}
# folder -> the folders it may import ("root": glm_mlx's own top-level modules)
ALLOWED = {
    "root": {"model"},
    "model": {"root", "hub"},
    "generation": {"root", "model"},
    "batch": {"generation", "model"},
    "prefix": {"root", "generation"},
    "serve": {"batch", "generation"},
    "hub": {"root"},
    "distributed": {"root", "model", "generation"},
    "quantize": {"root", "model", "hub", "distributed"},
    "cli": {"root", "model", "generation", "batch", "prefix", "serve", "hub", "distributed", "quantize"},
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for p in (ROOT / folder).rglob("*.py"):
            rel = p.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((package, *rel))] = p
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    g = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                mod = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and t != "glm_mlx" and not m.startswith(t + "."):
                    g[m].add(t)
    return g


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "root"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(graph()) == []


def test_folders_import_only_what_the_table_allows():
    bad = sorted({f"{m} -> {t}" for m, ts in graph().items() for t in ts
                  if folder(m) != folder(t) and folder(t) not in ALLOWED[folder(m)]})
    assert bad == []


def test_the_root_holds_only_the_face_and_small_helpers():
    root = sorted(p.stem for p in (ROOT / "glm_mlx").glob("*.py"))
    assert root == ["__init__", "atomic", "disk", "errors", "memory", "progress"]
