"""Unit: the package's layers, read from its import statements (top-level and deferred)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clusterrun"


def imports() -> dict[str, set[str]]:
    """Each module's clusterrun imports that run, wherever in the module they are written."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found = graph.setdefault(path.stem, set())
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):    # `if TYPE_CHECKING:` imports never run
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING":
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_no_module_imports_itself_back():
    graph = imports()
    cycles = sorted(m for m in graph if m in reaches(graph, m))
    assert cycles == []


def test_the_plan_and_the_agent_stay_pure():
    graph = imports()
    assert not {"transport", "paramikossh", "openssh", "remote"} & reaches(graph, "plan")
    assert graph["nodeagent"] == set()          # shipped to the nodes alone: stdlib only
    assert not {"controller", "launch", "cli"} & reaches(graph, "options")
