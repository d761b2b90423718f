"""Whole-job restarts (`up --max-restarts`) and spare nodes (`spares:`).

When an attempt fails, every node has already been stopped (fail fast). Before the
next attempt, each node must be there again: its connection still up, or made
anew; a node that cannot be reached is replaced by the first spare that is
reachable and passes the preflight (python, script, torch, versions alike), which
takes over its node_rank and its ranks. Then the job starts again, on every node,
with a fresh rendezvous and CLUSTERRUN_ATTEMPT one higher.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..transports.connect import connect_node
from ..errors import UnreachableError
from ..hostsfile import Host, HostsFile
from ..model import NodeResult, NodeState
from ..parallel import each
from .results import summary
from .runs import RunDir
from .stream import Terminal
from ..transports.base import Transport


@dataclass
class Roster:
    """Who runs the next attempt: the hosts in node_rank order, their connections,
    the spares not used yet, and which node each replacement stands in for."""

    hosts: HostsFile
    transports: list[Transport | None]      # None: not connected (a collector found it ended)
    spares: list[Host]
    replaced: dict[str, str] = field(default_factory=dict)     # spare's name -> the node's


# What keeps a spare at node_rank i of these hosts, connected so, from standing in
# (the preflight's problems with it, in words); none: it may.
Vet = Callable[[HostsFile, Sequence["Transport | None"], int], list[str]]


def attempt_of(attempt: int, max_restarts: int) -> str:
    """`attempt 1 of 0-2`: attempts are numbered from 0, as CLUSTERRUN_ATTEMPT, `logs
    --attempt` and `status --json` number them, and the range says how many there may be."""
    return f"attempt {attempt} of 0-{max_restarts}"


def first_failure(results: list[NodeResult], run: RunDir) -> str:
    """What ended an attempt, as the summary's first line says it."""
    for line in summary(results, run, tail=1):
        return line.removeprefix("clusterrun: ")
    return "it failed"


def should_restart(results: list[NodeResult], run: RunDir, interrupted: bool, attempt: int,
                   max_restarts: int) -> bool:
    """A failed attempt with restarts left, not ended on purpose (Ctrl-C, kill)."""
    failed = not all(r.ok for r in results)
    return failed and attempt < max_restarts and not interrupted and run.killed_reason() is None


def wait_delay(run: RunDir, delay: float) -> bool:
    """Sleep the restart delay; False if the run was killed meanwhile (Ctrl-C raises)."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        if run.killed_reason() is not None:
            return False
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    return run.killed_reason() is None


def next_roster(roster: Roster, results: list[NodeResult], term: Terminal, vet: Vet | None = None) -> Roster:
    """Every node of the next attempt, connected; raises UnreachableError naming the
    node that is missing when no spare is left to take its place. `vet`: the
    preflight a spare must pass first (none with --skip-check)."""
    hosts = list(roster.hosts.hosts)
    transports = list(roster.transports)
    spares = list(roster.spares)
    replaced = dict(roster.replaced)
    timeout = roster.hosts.connect_timeout

    # The results come in the order the nodes ended, not in node_rank order.
    ended = {r.node.node_rank: r.state for r in results}

    def settled(j: int) -> bool:        # a node whose connection this attempt can use as it is
        t = transports[j]
        # On Slurm no connection proves a node is there: each is proved by a step of its own.
        return t is not None and ended.get(j) != NodeState.LOST and t.alive() and not hosts[j].slurm_job

    # Every other node itself, if it answers again: all at once, so that the lost
    # nodes cost one connect timeout together, not one each.
    again = [i for i in range(len(hosts)) if not settled(i)]
    for i in again:
        old = transports[i]
        if old is not None:
            old.close()
        transports[i] = None
    missing: dict[int, str] = {}        # node_rank -> why it did not answer
    for i, o in zip(again, each(again, lambda i: connect_node(hosts[i], timeout, prove=True))):
        if isinstance(o.error, UnreachableError):
            missing[i] = str(o.error)
        elif o.error is not None:
            raise o.error
        else:
            transports[i] = o.value
    for i, why in missing.items():      # in node_rank order: spares are taken first come, first served
        while spares:
            spare = spares.pop(0)
            try:
                stand_in = connect_node(spare, timeout, prove=True)
            except UnreachableError as e:
                term.message(f"clusterrun: spare {spare.name} is unreachable too: {e}")
                continue
            transports[i] = stand_in
            lost, hosts[i] = hosts[i], dataclasses.replace(spare, nproc_per_node=hosts[i].nproc_per_node)
            # Probed with the nodes already there (not those still missing, which are None).
            problems = vet(dataclasses.replace(roster.hosts, hosts=tuple(hosts)), transports, i) if vet else []
            if problems:
                term.message(f"clusterrun: spare {spare.name} cannot stand in: {'; '.join(problems)}")
                hosts[i] = lost
                stand_in.close()
                transports[i] = None
                continue
            term.message(f"clusterrun: {lost.name} was lost; {spare.name} takes node_rank {i}")
            replaced[spare.name] = replaced.pop(lost.name, lost.name)
            break
        else:
            raise UnreachableError(f"{hosts[i].name} (node_rank {i}) is missing and no spare is left: {why}")
    return Roster(dataclasses.replace(roster.hosts, hosts=tuple(hosts)), transports, spares, replaced)
