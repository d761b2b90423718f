"""`clusterrun kill`: end a run on every node, and only that run; verified."""

from __future__ import annotations

from .controller import ControlOptions, collect, kill_run
from .errors import UnreachableError
from .runs import RunDir, list_run_ids, runs_root
from .stream import Terminal


def kill(run_id: str | None, all_runs: bool, grace: float, opts: ControlOptions) -> int:
    if all_runs:
        runs = [RunDir(runs_root() / i) for i in list_run_ids()]
        runs = [r for r in runs if not r.ended()]
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
        # Nobody watching the run (detached collector gone, `up` killed)? Collect its
        # last lines and record its end ourselves. Otherwise its collector does.
        collect(run, Terminal(), ControlOptions(**{**opts.__dict__, "print_lines": False,
                                                   "fail_fast": False, "report": False,
                                                   "interrupt_stops_run": False}))
        if not found:
            term.message(f"clusterrun: killed run {run.run_id}: nothing of it is left on its nodes")
    if problems:
        raise UnreachableError("could not verify every node:\n  " + "\n  ".join(problems))
    return 0
