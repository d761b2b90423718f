"""`clusterrun kill`: end a run on every node, and only that run; verified."""

from __future__ import annotations

import threading
from typing import Any

from .controller import ControlOptions, collect_with, connect_live
from .errors import UnreachableError
from .plan import NodePlan
from .remote import kill_job
from .runs import RunDir, list_run_ids, runs_root
from .stream import Terminal
from .transport import Transport


def kill(run_id: str | None, all_runs: bool, grace: float, opts: ControlOptions) -> int:
    if all_runs:
        runs = [r for r in (RunDir(runs_root() / i) for i in list_run_ids()) if not r.ended()]
    else:
        runs = [RunDir.find(run_id)]
    term = Terminal()
    problems: list[str] = []
    for run in runs:
        if run.ended():
            term.message(f"clusterrun: run {run.run_id} has already ended")
            continue
        found = kill_run(run, grace, opts)
        problems += found
        if not found:
            term.message(f"clusterrun: killed run {run.run_id}: nothing of it is left on its nodes")
    if problems:
        raise UnreachableError("could not verify every node:\n  " + "\n  ".join(problems))
    return 0


def kill_run(run: RunDir, grace: float, opts: ControlOptions) -> list[str]:
    """TERM, then KILL after grace, every process of the run on every live node; verified.

    Returns the problems (nodes not reached or not confirmed clean). With nobody
    collecting the run (its `up` was killed, its background collector is gone),
    the same connections then collect its last lines and record its end.
    """
    plan = run.plan()
    (run.path / "killed").write_text("clusterrun kill")
    try:
        conns = connect_live(run, plan, opts, consequence="nothing was killed")
    except UnreachableError as e:
        return [str(e)]
    problems: list[str] = []

    def one(node: NodePlan, t: Transport) -> None:
        try:
            rep: dict[str, Any] = kill_job(node, t, grace)
        except Exception as e:  # noqa: BLE001 - report the node, go on with the others
            problems.append(f"{node.name}: {type(e).__name__}: {e}")
            return
        if rep.get("event") != "killed" or rep.get("left"):
            problems.append(f"{node.name}: {rep}")

    threads = [threading.Thread(target=one, args=(n, t)) for n, t in zip(plan.nodes, conns) if t]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lock = run.lock()
    if lock is None:                # a collector is watching: it records the end
        for t in conns:
            if t is not None:
                t.close()
        return problems
    with lock:
        quiet = ControlOptions(**{**opts.__dict__, "print_lines": False, "fail_fast": False,
                                  "report": False, "interrupt_stops_run": False})
        collect_with(run, plan, conns, Terminal(), quiet)   # closes the connections
    return problems
