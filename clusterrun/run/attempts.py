"""A run's attempts: each attempt's plan, and the loop that restarts the whole job
(`up --max-restarts`), for the attached `up` and the collector of `up -d` alike.

Like torch elastic's agent loop: an attempt starts, is watched until it ends, and
then either the run ends or, after a failure with restarts left, every node is
brought back (restart.py: a spare in a lost node's place) and the next attempt
starts with a plan of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UnreachableError
from ..hostsfile import Host, HostsFile
from ..model import NodeResult
from ..options import LaunchOptions
from ..plan import Facts, Plan, asked_master_port, build_plan, needs_probe
from ..transports.base import Transport
from .controller import Continue, RunController
from .preflight import PreflightError, find_facts, judge, probe_all, probe_spec
from .startlimit import StartTimeout
from .restart import Roster, Vet, attempt_of, first_failure, next_roster, should_restart, wait_delay
from .runs import clusterrun_home
from .stream import Terminal
from .sync import sync_all


@dataclass(frozen=True)
class Restarts:
    """What a run needs to start itself again (`--max-restarts`): the hosts file with its
    spares, and what to run. The attached `up` keeps it; `up -d` hands it to the
    collector over a pipe, so the env's secrets are never written down."""

    hosts: HostsFile
    launch: LaunchOptions
    max_restarts: int = 0
    delay: float = 5.0
    check: bool = True      # a spare must pass the preflight (not with --skip-check)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Restarts:
        d = json.loads(text)
        hosts = d["hosts"]
        hosts = HostsFile(**{**hosts, "hosts": tuple(map(_host, hosts["hosts"])),
                             "spares": tuple(map(_host, hosts["spares"]))})
        launch = LaunchOptions(**{**d["launch"], "script_args": tuple(d["launch"]["script_args"])})
        return cls(hosts, launch, d["max_restarts"], d["delay"], d["check"])


def _host(d: dict[str, Any]) -> Host:
    """A Host from its JSON form: its lists were tuples (`setup:`, `gpus:`)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return Host(**fields)


def plan_attempt(hosts: HostsFile, opts: LaunchOptions, transports: Sequence[Transport], term: Terminal, *,
                 run_id: str, attempt: int = 0, checks: bool = True, sync: Path | None = None) -> Plan:
    """An attempt's plan, made from what its nodes told (plan.Facts). The first attempt
    (`up`'s start) first syncs `sync` to every node, and says what it checks and warns of;
    a later one is quiet (its spares were vetted by then). Before the probe, each node's
    agent is started through a provisional plan: what the facts change (the port, the
    GPU counts and so the ranks) is none of what starts an agent. Raises PreflightError,
    or StartTimeout if a node has not answered within the hosts file's start_timeout."""
    known = Facts(node0_addr=transports[0].peer_addr)
    make = functools.partial(build_plan, hosts, opts, run_id=run_id, local_home=str(clusterrun_home()),
                             attempt=attempt)
    reach = make(known, provisional=True)
    if sync is not None:
        term.progress(f"syncing {sync} to {len(hosts.hosts)} nodes")
        sent = sync_all(reach, transports, sync)
        if sent:
            term.message("clusterrun: synced " + ", ".join(f"{n} ({k} files)" for n, k in sent.items()))
    if not needs_probe(hosts, opts):
        return reach        # it waited for no fact: it is the plan (checked inside the start: Gate)
    if attempt == 0:
        term.progress(f"checking {len(hosts.hosts)} nodes")
    facts, warnings = find_facts(reach, transports, opts, asked_master_port(hosts, opts), known, checks,
                                 hosts.start_timeout, term.progress)
    for warning in warnings if attempt == 0 else ():
        term.message(f"clusterrun: warning: {warning}")
    return make(facts)


def spare_vet(opts: LaunchOptions, run_id: str, attempt: int) -> Vet:
    """The preflight a spare passes before it stands in: the nodes already there are
    probed with it, so that a version differing from theirs is its problem too."""
    def vet(hosts: HostsFile, transports: Sequence[Transport | None], i: int) -> list[str]:
        first = transports[0]
        assert first is not None, "the nodes before a spare's place are connected"
        plan = build_plan(hosts, opts, Facts(node0_addr=first.peer_addr), run_id=run_id,
                          local_home=str(clusterrun_home()), attempt=attempt, provisional=True)
        specs = [probe_spec(plan, n, opts.script, opts.module, None, torch=False) for n in plan.nodes]
        mine = plan.nodes[i].name + ": "
        results, _ = probe_all(plan, transports, specs, hosts.start_timeout)   # a late node: its problem
        return [p.removeprefix(mine) for p in judge(plan, results, opts, 0).problems if p.startswith(mine)]
    return vet


def run_attempts(ctl: RunController, results: list[NodeResult], restarts: Restarts, term: Terminal
                 ) -> tuple[RunController, list[NodeResult]]:
    """The loop of attempts, once the first has ended (`results`): while an attempt
    failed and restarts are left, start the next and watch it. The controller and the
    results of the last attempt."""
    plan, most = ctl.plan, restarts.max_restarts
    roster = Roster(restarts.hosts, [], list(restarts.hosts.spares))
    while should_restart(results, ctl.run, ctl.interrupted, plan.attempt, most):
        nxt = _next_attempt(ctl, results, roster, restarts, plan, term)
        if nxt is None:
            return ctl, results
        ctl, plan, roster = nxt
        results = ctl.wait()
    if most and not all(r.ok for r in results) and plan.attempt == most:
        term.message(f"clusterrun: {attempt_of(plan.attempt, most)} failed too: no restart left")
    return ctl, results


def _slurm_job_ended(hosts: HostsFile) -> str:
    """Why no node of a Slurm run can start a step, if its Slurm job has ended: Slurm
    ends an allocation made without --no-kill when one of its nodes goes down."""
    job = hosts.hosts[0].slurm_job if hosts.hosts else None
    if job is None:
        return ""
    from ..slurm import job_states
    state = job_states([job])[job]
    if not state.ended and state.state != "COMPLETING":     # ending: its steps are being killed
        return ""
    return (f"\nclusterrun: {state.text()}: Slurm ends an allocation when one of its nodes goes down, "
            "unless it was made with --no-kill (`salloc --no-kill`, `#SBATCH --no-kill`), which keeps "
            "its other nodes for the spares")


def restart_loop(restarts: Restarts, term: Terminal) -> Continue:
    """run_attempts as what a collector does once its attempt has ended (`up -d`)."""
    return lambda ctl, results: run_attempts(ctl, results, restarts, term)


def _next_attempt(ctl: RunController, results: list[NodeResult], roster: Roster, restarts: Restarts,
                  plan: Plan, term: Terminal) -> tuple[RunController, Plan, Roster] | None:
    """After a failed attempt: wait the delay, bring every node back (or a spare in its
    place), and start the next attempt. None: the run ends here (killed, or a node missing)."""
    run, opts, delay, attempt = ctl.run, restarts.launch, restarts.delay, plan.attempt + 1
    term.message(f"clusterrun: {attempt_of(plan.attempt, restarts.max_restarts)} failed: "
                 f"{first_failure(results, run)}; restarting in {delay:g}s")
    roster.transports = list(ctl.end_attempt())
    try:
        if not wait_delay(run, delay):
            term.message(f"clusterrun: {run.killed_reason()} during the restart delay: no further attempt")
            return None
        vet = spare_vet(opts, run.run_id, attempt) if restarts.check else None
        roster = next_roster(roster, results, term, vet)
    except UnreachableError as e:
        term.message(f"clusterrun: no further attempt: {e}{_slurm_job_ended(restarts.hosts)}")
        return None
    except KeyboardInterrupt:
        run.mark_killed("Ctrl-C")
        term.message("clusterrun: interrupted during the restart delay: no further attempt")
        ctl.interrupted = True
        return None
    transports = [t for t in roster.transports if t is not None]
    assert len(transports) == len(roster.transports), "next_roster connects every node"
    try:
        plan = plan_attempt(roster.hosts, opts, transports, term, run_id=run.run_id, attempt=attempt,
                            checks=False)
    except (PreflightError, StartTimeout) as e:    # a node's setup hung this time: the run ends here
        term.message(f"clusterrun: no further attempt: {e}")
        return None
    run.write_plan(plan)
    run.start_attempt(plan, restarts.max_restarts, roster.replaced)
    nxt = RunController(plan, run, transports, term, ctl.opts)
    nxt.launch(start=True)
    return nxt, plan, roster
