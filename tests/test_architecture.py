"""ARCHITECTURE.md's floors, read from the sources: no import circle, each floor imports only the ones below it,
and a stage's `main` reads as the stage's outline (at most 40 lines); the launcher's commands start without torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO, STAGES, direct_imports

SKYTUNE = REPO / "src" / "skytune"
MODULES = sorted(SKYTUNE.rglob("*.py"))
FLOORS = ("core", "stages", "face")
MAIN_MAX_LINES = 40


def name(path: Path) -> str:
    return ".".join(path.relative_to(REPO / "src").with_suffix("").parts).removesuffix(".__init__")


def circles(graph: dict[Path, set[Path]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), or a module importing itself."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    found: list[list[str]] = []

    def visit(node: Path) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(name(m) for m in group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circle() -> None:
    graph = {m: direct_imports(m) for m in MODULES}
    assert sum(map(len, graph.values())) > 100  # the walk does see the imports
    assert circles(graph) == []


def test_circles_are_found() -> None:
    """The finder itself, on a graph with a known circle through three modules and one without."""
    a, b, c, d = (SKYTUNE / f"{x}.py" for x in "abcd")
    assert [len(g) for g in circles({a: {b}, b: {c}, c: {a, d}, d: set()})] == [3]
    assert circles({a: {b}, b: {c}, c: {d}, d: set()}) == []


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(SKYTUNE)))
def test_a_floor_imports_only_the_floors_below(module: Path) -> None:
    parts = module.relative_to(SKYTUNE).parts
    if parts[0] not in FLOORS:
        return
    below = FLOORS[: FLOORS.index(parts[0]) + 1]
    above = {i.relative_to(SKYTUNE).parts[0] for i in direct_imports(module)} - set(below) - {"__init__.py"}
    assert not above, f"{name(module)} imports from {sorted(above)}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_main_is_its_outline(stage: str) -> None:
    tree = ast.parse((SKYTUNE / "stages" / f"{stage}.py").read_text(encoding="utf-8"))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno is not None
    lines = main.end_lineno - main.lineno + 1
    assert lines <= MAIN_MAX_LINES, f"stages/{stage}.py main is {lines} lines (at most {MAIN_MAX_LINES})"


def test_the_launchers_commands_start_without_torch() -> None:
    """`make launch`, `make sweep`, `make preflight` and `make sweep-pull` answer in a fraction of a second: the
    modules they run import no torch (~1.5 s of every start, and of every refusal)."""
    import subprocess
    import sys

    modules = ("skytune.face.cloud.jobs", "skytune.face.cloud.sweep", "skytune.face.cloud.preflight",
               "skytune.face.cloud.buckets", "skytune.face.cloud.remote_data")
    probe = f"import sys; import {', '.join(modules)}; print(sorted(m for m in ('torch', 'transformers') " \
            "if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
