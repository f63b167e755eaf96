"""Check the house rules of ``src/trim_select`` (ARCHITECTURE.md): the import graph runs one way
(rooms ranked below, a module imports only its own room or lower ones; no cycles), no module imports
another's private (``_name``) names, and no file over ~400 lines / function over ~60 lines except
those listed in ``ALLOWED`` with a reason. Exit code 1 and one line per violation otherwise.

    python scripts/check_layout.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "trim_select"
MAX_FILE, MAX_FUNC = 400, 60

# The rooms, bottom to top: data flows records -> token sequences -> fingerprints -> scores ->
# coreset -> evidence. A module may import its own room and rooms below it, never above.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("config", "io", "locking", "interrupts", "data", "host", "batching", "selection", "progress",
                "testing")),
    ("models", ("models", "layers")),
    ("method", ("saliency", "fingerprints", "scoring", "generic")),
    ("outputs", ("outputs",)),
    ("training", ("training",)),
    ("engine-steps", ("engines.base", "engines")),
    ("selector", ("selector",)),
    ("engines", ("engines.local", "engines.ray", "engines.shards", "engines.dispatch")),
    ("warmup", ("warmup", "pipeline")),
    ("baselines", ("baselines",)),
    ("evaluation", ("evaluation",)),
    ("comparison", ("comparison",)),
    ("reports", ("reports",)),
    ("cli", ("cli",)),
    ("package", ("__init__",)),
]

# Files and functions over the limits, with the reason (keep this list short and honest).
ALLOWED: dict[str, str] = {
    "reports/figures.py::figure_lengths": "68 lines: one matplotlib figure, panel by panel",
    "reports/load.py::load_pools": "67 lines: moved verbatim from reports.py",
    "reports/stats.py::compute_summary": "63 lines: moved verbatim from reports.py",
    "baselines/dsir.py::score_dsir": "62 lines: one DSIR call sequence (fit, weights, info)",
}
# Imports that the room order allows but the architecture forbids (issue 12): baselines and
# evaluation use training/, never the warmup pipeline or the scale-out engines.
FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("evaluation", "warmup"), ("evaluation", "pipeline"), ("evaluation", "engines"),
    ("baselines", "warmup"), ("baselines", "pipeline"), ("baselines", "engines"),
    ("training", "selector"), ("training", "engines"),
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def room_of(mod: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(ROOMS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def runtime_imports(tree: ast.Module, mod: str, is_pkg: bool) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) of imports executed at import time or in functions,
    skipping ``if TYPE_CHECKING:`` blocks."""
    out = []
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        pkg = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*pkg, *(node.module.split(".") if node.module else [])])
        out.append((target, [a.name for a in node.names], node.lineno))
    return out


def check() -> list[str]:
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    for mod, path in sorted(modules.items()):
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        tree = ast.parse(text)
        n_lines = len(text.splitlines())
        if n_lines > MAX_FILE and rel not in ALLOWED:
            problems.append(f"{rel}: {n_lines} lines > {MAX_FILE}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNC and f"{rel}::{node.name}" not in ALLOWED and rel not in ALLOWED:
                    problems.append(f"{rel}:{node.lineno}: function {node.name} has {length} lines > {MAX_FUNC}")
        is_pkg = path.name == "__init__.py"
        for target, names, line in runtime_imports(tree, mod, is_pkg):
            if target in modules or any(f"{target}.{n}" in modules for n in names):
                for n in names:
                    sub = f"{target}.{n}" if target else n
                    dest = sub if sub in modules else target
                    if dest != mod:
                        graph.setdefault(mod, set()).add(dest)
                    if n.startswith("_") and sub not in modules and dest != mod:
                        problems.append(f"{rel}:{line}: imports private name {n} of {target}")
                    for src_room, dst_room in FORBIDDEN:
                        if (mod == src_room or mod.startswith(src_room + ".")) and (
                                dest == dst_room or dest.startswith(dst_room + ".")):
                            problems.append(f"{rel}:{line}: {src_room} must not import {dest}")
                    if room_of(dest) > room_of(mod):
                        problems.append(f"{rel}:{line}: {mod} ({ROOMS[room_of(mod)][0]}) imports {dest} "
                                        f"({ROOMS[room_of(dest)][0]}), a room above it")
    problems += cycles(graph)
    return problems


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per import cycle found by depth-first search (package -> own submodule excluded)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package re-exporting its own modules
            if state.get(nxt) == 1:
                found.append("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


if __name__ == "__main__":
    issues = check()
    print("\n".join(issues) if issues else "layout ok")
    sys.exit(1 if issues else 0)
