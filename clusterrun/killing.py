"""`clusterrun kill`: end a run on every node, and only that run; verified."""

from __future__ import annotations

import functools

from .control import request_kill
from .errors import UnreachableError
from .options import WatchOptions
from .runs import RunDir, list_run_ids, runs_root
from .stream import Terminal


def kill(run_id: str | None, all_runs: bool, grace: float) -> int:
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
        found = kill_run(run, grace)
        problems += found
        if not found:
            term.message(f"clusterrun: killed run {run.run_id}: nothing of it is left on its nodes")
    if problems:
        raise UnreachableError("could not verify every node:\n  " + "\n  ".join(problems))
    return 0


def kill_run(run: RunDir, grace: float) -> list[str]:
    """TERM, then KILL after grace, every process of the run on every live node; verified.

    Returns the problems (nodes not reached or not confirmed clean). A live
    collector does it over the connections it holds. With nobody collecting the
    run (its `up` was killed, its background collector is gone), kill connects
    itself, and the same connections then collect its last lines and record its end.
    """
    plan = run.plan()
    run.mark_killed("clusterrun kill")
    problems = request_kill(run, grace)
    if problems is not None:
        return problems
    # Only now the SSH side of clusterrun: the path above never loads it.
    from .connect import connect_live
    from .controller import collect_with
    from .remote import confirm_kills, kill_job

    opts = WatchOptions()
    try:
        conns = connect_live(run, plan, opts, consequence="nothing was killed")
    except UnreachableError as e:
        return [str(e)]
    problems = confirm_kills([(n.name, functools.partial(kill_job, n, t, grace))
                              for n, t in zip(plan.nodes, conns) if t])
    lock = run.lock()
    if lock is None:                # a collector is watching: it records the end
        for t in conns:
            if t is not None:
                t.close()
        return problems
    with lock:
        collect_with(run, plan, conns, Terminal(), opts.quiet())   # closes the connections
    return problems
