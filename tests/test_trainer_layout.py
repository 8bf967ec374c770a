"""The trainer's layers (docs/architecture.md): imports run one way, no cycle, no module over 350 lines.

(``tests/test_serving_layout.py`` holds the serving package to the same.)

Function-level imports count: a cycle hidden inside a function is still a
cycle. The layer order is ``cli -> run -> finish -> {publish, report}`` and
``run -> search -> data -> model``; ``config``, ``quiet``, ``compat``,
``distribute``, ``progress`` and ``staging`` sit below everything.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 350

# A module may import from its own layer or any layer to its right.
LAYERS = ["cli", "run", "finish", "search", "publish", "report", "data", "model", "distribute", "compat", "quiet",
          "progress", "staging", "config"]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path, package: str) -> set[str]:
    """Every module of ``package`` that ``path`` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                exists = any((ROOT / candidate.replace(".", "/")).with_suffix(s).exists() for s in (".py",)) or \
                    (ROOT / candidate.replace(".", "/") / "__init__.py").exists()
                found.add(candidate if exists else node.module)
    return found


def graph(package: str) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in imports_of(path, package) if m in modules and m != name}
            for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_no_import_cycle():
    assert cycles(graph("trainer")) == []


def test_trainer_imports_run_one_way():
    upward = [f"{a} imports {b}" for a, targets in graph("trainer").items() for b in targets
              if layer(a) >= 0 and layer(b) >= 0 and layer(b) < layer(a)]
    assert upward == []


def test_trainer_never_imports_serving():
    used = {m for path in (ROOT / "trainer").rglob("*.py") for m in imports_of(path, "serving")}
    assert used == set()


def test_no_module_over_350_lines():
    long = {module_name(p): n for p in (ROOT / "trainer").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
