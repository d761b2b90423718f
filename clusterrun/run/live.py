"""Connections to the nodes of a run that is already going (kill, stacks, a reattaching collector)."""

from __future__ import annotations

from ..options import WatchOptions
from ..plan import Plan
from ..transports.base import Transport
from ..transports.connect import connect_all
from .records import has_ended
from .runs import RunDir


def connect_live(run: RunDir, plan: Plan, opts: WatchOptions, consequence: str = "nothing was done",
                 visiting: bool = False) -> list[Transport | None]:
    """Connections to the run's nodes in parallel; None for nodes already recorded as ended.
    `visiting`: only looking in (stacks), not collecting: the run's masters stay its collector's."""
    states = run.node_states()
    live = [n for n in plan.nodes if not has_ended(states.get(n.node_rank))]
    conns = connect_all([n.host for n in live], opts.connect_timeout, opts.accept_new_host_keys,
                        consequence, scope=plan.run_id, visiting=visiting) if live else []
    by_rank = dict(zip((n.node_rank for n in live), conns))
    return [by_rank.get(n.node_rank) for n in plan.nodes]
