"""Unit: the package's layers, read from its import statements (top-level and deferred).

The layers, lowest first; a module may import from its own layer and those below it:

    plan        the top-level modules: hosts file, plan, options, model, errors, the node agent;
                and scriptlint/, the checks of `lint`
    transports  clusterrun/transports/: how a command reaches a node
    stream      run/stream.py, run/launcherlog.py, run/runs.py, run/records.py: lines, logs and run records
    run         the rest of clusterrun/run/: controller, remote job, results, restarts, preflight
    commands    clusterrun/commands/: one module per user command
    cli         cli.py and __main__.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clusterrun"
LAYERS = ["plan", "transports", "stream", "run", "commands", "cli"]
STREAM = {"run.stream", "run.launcherlog", "run.runs", "run.records"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    if module in ("cli", "__main__"):
        return "cli"
    if module in STREAM:
        return "stream"
    head = module.partition(".")[0]
    if head in ("transports", "run", "commands"):
        return head
    return "plan"       # the top-level modules and the plan layer's packages (scriptlint/)


def imports() -> dict[str, set[str]]:
    """Each module's clusterrun imports that run, wherever in the module they are written."""
    graph: dict[str, set[tuple[str, str]]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        found = graph.setdefault(name, set())
        package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):    # `if TYPE_CHECKING:` imports never run
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING":
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[: len(package) - (node.level - 1)] + (node.module or "").split(".")
                # `from ..run import remote` names a module; `from .plan import Plan` a name in one
                found.update((".".join(base + [a.name]), ".".join(base).strip(".")) for a in node.names)
    known = {module_name(path) for path in PACKAGE.rglob("*.py")}
    return {m: {sub if sub in known else mod for sub, mod in deps} - {""} for m, deps in graph.items()}


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_the_graph_sees_the_package():
    graph = imports()
    assert {"plan", "nodeagent", "transports.paramiko", "run.controller", "commands.up", "cli"} <= set(graph)
    assert "run.controller" in graph["commands.up"]
    assert "transports.base" in graph["run.remote"]


def test_no_module_imports_a_layer_above_its_own():
    graph = imports()
    upward = sorted(f"{m} ({layer(m)}) imports {d} ({layer(d)})"
                    for m, deps in graph.items() for d in deps
                    if d in graph and LAYERS.index(layer(d)) > LAYERS.index(layer(m)))
    assert upward == []


def test_a_command_imports_no_other_command():
    graph = imports()
    crossing = sorted(f"{m} imports {d}" for m, deps in graph.items() if layer(m) == "commands"
                      for d in deps if layer(d) == "commands" and not d.startswith(m))
    assert crossing == []


def test_no_module_imports_itself_back():
    graph = imports()
    cycles = sorted(m for m in graph if m in reaches(graph, m))
    assert cycles == []


def test_the_plan_and_the_agent_stay_pure():
    graph = imports()
    assert not {m for m in reaches(graph, "plan") if layer(m) != "plan"}
    assert graph["nodeagent"] == set()          # shipped to the nodes alone: stdlib only
    assert not {"run.controller", "commands.up", "cli"} & reaches(graph, "options")


def test_the_script_checks_stand_alone():
    # `up` warns with them and `lint` prints them: neither command's modules come along.
    graph = imports()
    assert "scriptlint" in graph["commands.lint"] and "scriptlint" in reaches(graph, "commands.up")
    assert {m for m in reaches(graph, "scriptlint") if not m.startswith("scriptlint")} == set()
