"""`clusterrun logs`: a run's lines, tagged, from its per-rank logs; -f follows it live."""

from __future__ import annotations

from dataclasses import replace

from ..run.controller import collect
from ..errors import EXIT_INTERRUPTED, UsageError
from ..options import WatchOptions
from ..run.logfiles import Follower, print_attempt, select, show_so_far
from ..run.runs import RunDir
from ..run.submit import unplanned, unplanned_state, wait_planned
from ..run.stream import Terminal


def logs(run_id: str | None, ranks: tuple[int, ...], node: str | None, follow: bool,
         tail: int | None, opts: WatchOptions, attempt: int | None = None) -> int:
    run = RunDir.find(run_id)
    term = Terminal()
    sub = unplanned(run)
    if sub is not None:             # submitted to Slurm, not started yet
        _, why = unplanned_state(run, sub)
        if follow:
            term.message(f"clusterrun: run {run.run_id}: {why}; its lines follow once it starts")
        if not follow or not wait_planned(run, sub):
            term.message(f"clusterrun: run {run.run_id} has no lines: {unplanned_state(run, sub)[1]}")
            return 0
    plan = run.plan()
    files = select(run, plan, ranks, node)
    records = run.attempts()
    if attempt is not None and not 0 <= attempt < max(1, len(records)):
        raise UsageError(f"run {plan.run_id} has attempts 0-{max(1, len(records)) - 1}, not {attempt}")
    if not follow:
        if not run.ended():         # bring the logs up to date if nobody else is
            collect(run, Terminal(), opts.quiet(), follow=False)
        records = run.attempts()
        if attempt is not None and records:
            print_attempt(term, files, records, attempt, tail, marker=False)
        else:
            show_so_far(term, files, records, tail)
        return 0
    wanted = {(f.node.node_rank, f.key) for f in files}

    def show_existing() -> None:
        show_so_far(term, files, run.attempts(), tail)

    # Following is watching: Ctrl-C stops following, never the run; the run's own
    # summary is `up`'s and `status`'s to give.
    follow_opts = replace(opts, print_lines=True, report=False, interrupt_stops_run=False,
                          show=lambda n, key: (n.node_rank, key) in wanted)
    code = collect(run, term, follow_opts, follow=True, before=show_existing)
    if code == EXIT_INTERRUPTED:
        return code
    if code is not None:
        return 0
    # Another process is collecting this run (and may restart it): follow its files.
    Follower(run, files, term, tail).follow(run.ended)
    return 0


