"""`clusterrun kill`: end a run on every node, and only that run; verified."""

from __future__ import annotations

import dataclasses
import functools

from ..run.control import request_kill
from ..errors import UnreachableError
from ..model import NodeState
from ..options import WatchOptions
from ..run.runs import RunDir, list_run_ids, runs_root
from ..run.stream import Terminal
from ..model import RunState
from ..run.records import Submission
from ..run.submit import end_job, stop_submitted, unplanned_state
from ..slurm import job_states


def kill(run_id: str | None, all_runs: bool, grace: float) -> int:
    if all_runs:
        runs = [r for r in (RunDir(runs_root() / i) for i in list_run_ids()) if not r.ended()]
    else:
        runs = [RunDir.find(run_id)]
    term = Terminal()
    problems: list[str] = []
    for run in runs:
        sub = run.submission()
        if sub is not None and not run.ended():
            if not run.has_plan():
                state, why = unplanned_state(run, sub)
                if state not in (RunState.PENDING, RunState.STARTING):
                    if not all_runs:
                        term.message(f"clusterrun: run {run.run_id} has already ended: {why}")
                    continue
            term.message(f"clusterrun: killed run {run.run_id}: {_kill_submitted(run, sub, grace, problems)}")
            continue
        if run.ended():
            lost = lost_nodes(run)
            if not lost:
                term.message(f"clusterrun: run {run.run_id} has already ended")
                continue
            gone = slurm_job_ended(run)
            if gone:
                term.message(f"clusterrun: run {run.run_id} has already ended, and {gone}: nothing of it "
                             "can be left on its nodes")
                continue
            found = kill_leftovers(run, lost, grace)
            problems += found
            if not found:
                term.message(f"clusterrun: run {run.run_id} had ended, but {', '.join(lost)} had been lost: "
                             "what was left of its job there is killed")
            continue
        found = kill_run(run, grace)
        problems += found
        if not found:
            term.message(f"clusterrun: killed run {run.run_id}: nothing of it is left on its nodes")
    if problems:
        raise UnreachableError("could not verify every node:\n  " + "\n  ".join(problems))
    return 0


def _kill_submitted(run: RunDir, sub: Submission, grace: float, problems: list[str]) -> str:
    """A live run `up` submitted to Slurm: stop its ranks the clusterrun way, then scancel
    the job clusterrun submitted (and only that); a pending one: cancel it. What was
    done, in words."""
    if not run.has_plan():
        done = stop_submitted(run, sub, "clusterrun kill")
        if done:
            return done
    found = kill_run(run, grace)
    problems += found
    end_job(sub.job)
    return ("nothing of it is left on its nodes" if not found else "not every node is confirmed clean") + \
        f", and its Slurm job {sub.job} is over"


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
    from ..run.live import connect_live
    from ..run.controller import collect_with
    from ..run.remote import confirm_kills, kill_job

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


def slurm_job_ended(run: RunDir) -> str:
    """On Slurm, a lost node's job lived in a step of the run's Slurm job (proctrack
    cgroup): once Slurm says that job ended, nothing of the run is left anywhere.
    Says so (`its Slurm job 14 has ended (CANCELLED)`), else ''."""
    job = run.plan().slurm_job
    if job is None:
        return ""
    st = job_states([job])[job]
    if not st.ended:
        return ""
    return f"its Slurm job {job} has ended ({st.state or 'Slurm no longer knows it'})"


def lost_nodes(run: RunDir) -> list[str]:
    """The nodes of an ended run that were unreachable at its end: their job may still
    run there, holding GPUs, until it is killed."""
    states = run.node_states()
    return [n.name for n in run.plan().nodes
            if (s := states.get(n.node_rank)) is not None and s.state == NodeState.LOST]


def kill_leftovers(run: RunDir, names: list[str], grace: float) -> list[str]:
    """Kill what is left of an ended run's job on its lost nodes (by the job's marker, so
    nothing else); each node killed clean is recorded as killed. The problems: nodes
    still unreachable or not confirmed clean."""
    from ..transports.connect import connect_each
    from ..run.remote import confirm_kills, kill_job

    plan = run.plan()
    nodes = [n for n in plan.nodes if n.name in names]
    opts = WatchOptions()
    conns = connect_each([n.host for n in nodes], opts.connect_timeout, opts.accept_new_host_keys,
                         scope=plan.run_id)
    problems = [f"{n.name}: {err} (its job may still run there)" for n, (t, err, _) in zip(nodes, conns) if t is None]
    reached = [(n, t) for n, (t, _, _) in zip(nodes, conns) if t is not None]
    try:
        failed = confirm_kills([(n.name, functools.partial(kill_job, n, t, grace)) for n, t in reached])
    finally:
        for _, t in reached:
            t.close()
    problems += failed
    states = run.node_states()
    for n, _ in reached:
        if not any(p.startswith(f"{n.name}: ") for p in failed):
            # Only lost nodes are here, so each has a record: it keeps its time and facts.
            run.set_node_state(n.node_rank, dataclasses.replace(
                states[n.node_rank], state=NodeState.KILLED,
                message="lost, then its job was killed by clusterrun kill"))
    return problems
