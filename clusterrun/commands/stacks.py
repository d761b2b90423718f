"""`clusterrun stacks`: every rank's Python stacks of a live run, grouped by identical stack.

The taking, parsing and grouping are run/stacks.py's (the hang watch uses them too).
"""

from __future__ import annotations

from ..errors import UsageError
from ..options import WatchOptions
from ..run.live import connect_live
from ..run.results import describe_ranks
from ..run.runs import RunDir
from ..run.submit import unplanned, unplanned_state
from ..run.stacks import group, render, save, take
from ..run.stream import Terminal


def stacks(run_id: str | None, ranks: tuple[int, ...], node: str | None, native: bool,
           children: bool, opts: WatchOptions) -> int:
    """Print and save the stacks of a live run's ranks; exit 1 if a node could not be read."""
    run = RunDir.find(run_id)
    sub = unplanned(run)
    if sub is not None:
        raise UsageError(f"run {run.run_id} has no ranks running: {unplanned_state(run, sub)[1]}")
    plan = run.plan()
    for r in ranks:
        if not 0 <= r < plan.world_size:
            raise UsageError(f"run {plan.run_id} has ranks 0-{plan.world_size - 1}, not {r}")
    if run.ended():
        raise UsageError(f"run {plan.run_id} has ended: no stacks to take")
    conns = connect_live(run, plan, opts, consequence="no stacks were taken", visiting=True)
    try:
        found, problems = take(plan, conns, ranks, node, native, children)
    finally:
        for t in conns:
            if t is not None:
                t.close()
    term = Terminal()
    text = render(group(found))
    if text:
        term.write(text.encode())
        term.message(f"clusterrun: stacks of {describe_ranks([s.rank for s in found])} "
                     f"saved in {save(run, text)}")
    for p in problems:
        term.message(f"clusterrun: {p}")
    if not found and not problems:
        term.message("clusterrun: no rank is running on the selected nodes")
    return 1 if problems or not found else 0
