"""`clusterrun status` and `clusterrun ps`: what each run and each of its nodes is doing."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..run.controller import collect
from ..options import WatchOptions
from ..model import FINAL_STATES, NodeState, RankFailure, RunState
from ..plan import NodePlan, Plan
from ..run.records import HangRecord, NodeRecord
from ..run.runs import RunDir, list_run_ids, runs_root
from ..run.restart import attempt_of
from ..run.results import describe_code, describe_ranks, plural
from ..run.stream import Terminal
from ..run.records import Submission
from ..run.submit import unplanned, unplanned_state
from ..slurm import JobState, job_states


def run_state(plan_nodes: int, states: Mapping[int, NodeRecord]) -> RunState:
    """The run's state, from its nodes' states."""
    if len(states) < plan_nodes or any(s.state == NodeState.STARTING for s in states.values()):
        return RunState.STARTING
    if any(s.state not in FINAL_STATES for s in states.values()):
        return RunState.RUNNING
    if any(s.state == NodeState.KILLED for s in states.values()):
        return RunState.KILLED
    if all(s.state == NodeState.EXITED and s.code == 0 for s in states.values()):
        return RunState.SUCCEEDED
    return RunState.FAILED


@dataclass(frozen=True)
class NodeStatus:
    """One node's line of `status` (and its entry in `status --json`)."""

    node: str
    host: str
    node_rank: int
    first_rank: int
    last_rank: int
    state: NodeState
    code: int | None = None
    message: str = ""
    stopped: bool = False
    failures: list[RankFailure] = field(default_factory=list)
    quiet: dict[int, float | None] = field(default_factory=dict)   # rank -> seconds since its last line

    @classmethod
    def of(cls, n: NodePlan, s: NodeRecord | None, quiet: dict[int, float | None]) -> "NodeStatus":
        if s is None:                   # not recorded yet: its start is on the way
            return cls(n.name, n.host.host, n.node_rank, n.ranks.start, n.ranks.stop - 1, NodeState.STARTING,
                       quiet=quiet)
        return cls(n.name, n.host.host, n.node_rank, n.ranks.start, n.ranks.stop - 1, s.state, s.code,
                   s.message, s.stopped, s.failures, quiet)

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "host": self.host, "node_rank": self.node_rank,
                "ranks": [self.first_rank, self.last_rank], "state": self.state.value, "code": self.code,
                "message": self.message, "stopped": self.stopped,
                "failures": [dataclasses.asdict(f) for f in self.failures],
                "quiet": {str(g): q for g, q in self.quiet.items()}}


@dataclass(frozen=True)
class RunStatus:
    """What `status` shows of a run: built once, rendered as text or as JSON."""

    run: str
    state: RunState
    hosts: str
    world_size: int
    nodes: list[NodeStatus]
    hang: HangRecord | None
    attempt: int
    max_restarts: int
    replaced: dict[str, str]
    slurm: JobState | None = None       # a run on Slurm: its job, as Slurm tells it now

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "run": self.run, "state": self.state.value, "hosts": self.hosts, "world_size": self.world_size,
            "nodes": [n.to_json() for n in self.nodes],
            "hang": self.hang.to_json() if self.hang else None, "attempt": self.attempt,
            "max_restarts": self.max_restarts, "replaced": dict(self.replaced)}
        if self.slurm is not None:      # only then: other runs' JSON stays as it was
            data["slurm"] = self.slurm.to_json()
        return data


def status_of(run: RunDir, opts: WatchOptions) -> RunStatus:
    if not run.ended():
        # Nobody may be watching the run (its `up` was killed): look at the nodes.
        collect(run, Terminal(), opts.quiet(), follow=False)
    plan, states = run.plan(), run.node_states()
    now = time.time()
    nodes = [NodeStatus.of(n, states.get(n.node_rank), {g: _quiet(run, g, now) for g in n.ranks})
             for n in plan.nodes]
    records = run.attempts()
    last = records[-1] if records else None
    job = plan.slurm_job
    return RunStatus(plan.run_id, run_state(len(plan.nodes), states), plan.hosts_path, plan.world_size,
                     nodes, run.hang(), plan.attempt, last.max_restarts if last else 0,
                     last.replaced if last else {}, job_states([job])[job] if job else None)


def attempt_text(attempt: int, max_restarts: int) -> str:
    """`attempt 1 of 0-2` for a run with restarts (numbered from 0, as everywhere), else nothing."""
    return attempt_of(attempt, max_restarts) if max_restarts else ""


def _quiet(run: RunDir, rank: int, now: float) -> float | None:
    """Seconds since the rank's last line reached its log (None: no line yet)."""
    try:
        return round(now - run.rank_log(rank).stat().st_mtime, 1)
    except FileNotFoundError:
        return None


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "no line yet"
    s = int(seconds)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def describe_node(n: NodeStatus) -> str:
    if n.state == NodeState.EXITED:
        if n.stopped and n.code != 0 and all(f.stopped for f in n.failures):
            return "stopped"        # by clusterrun, after another node failed: as the summary says
        own = [f for f in n.failures if not f.stopped]
        if n.stopped and n.code != 0 and own:
            # Ranks failed by themselves before the stop, which then ended torchrun (its
            # code is the stop's): say what they did, and which ranks the stop ended, as
            # the summary does.
            by_what: dict[str, list[int]] = {}
            for f in own:
                what = describe_code(f.exitcode) if f.exitcode is not None else "failed"
                by_what.setdefault(f"raised {f.raised}" if f.raised and what.startswith("was killed") else what,
                                   []).append(f.rank)
            rest = [g for g in range(n.first_rank, n.last_rank + 1) if g not in {f.rank for f in own}]
            return "; ".join([f"{describe_ranks(ranks)} {what}" for what, ranks in by_what.items()]
                             + ([f"{describe_ranks(rest)} stopped"] if rest else []))
        oom = [f.rank for f in n.failures if f.oom]
        what = describe_code(n.code) if n.code is not None else "exited (its code was not recorded)"
        return what + (f" ({describe_ranks(oom)} out of memory)" if oom else "")
    if n.message:
        return f"{n.state}: {n.message}"
    return str(n.state)


def status(run_id: str | None, as_json: bool, opts: WatchOptions) -> int:
    run = RunDir.find(run_id)
    sub = unplanned(run)
    if sub is not None:
        return _status_unplanned(run, sub, as_json)
    st = status_of(run, opts)
    if as_json:
        print(json.dumps(st.to_json(), indent=1))
        return 0
    for line in status_lines(st):
        print(line)
    return 0


def _status_unplanned(run: RunDir, sub: Submission, as_json: bool) -> int:
    """A run submitted to Slurm that its controller has not planned yet (pending, starting,
    or ended before it started): the run's state and why, and its job's."""
    job = job_states([sub.job])[sub.job] if sub.job else None
    state, why = unplanned_state(run, sub, job)
    if as_json:
        print(json.dumps({"run": run.run_id, "state": state.value, "hosts": sub.hosts, "world_size": None,
                          "nodes": [], "message": why, "slurm": job.to_json() if job else None}, indent=1))
        return 0
    print(f"run {run.run_id}: {state} ({sub.hosts}): {why}")
    if job is not None:
        print(job.text())
    return 0


def status_lines(st: RunStatus) -> list[str]:
    attempt = attempt_text(st.attempt, st.max_restarts)
    replaced = "".join(f", {spare} in place of {lost}" for spare, lost in st.replaced.items())
    lines = [f"run {st.run}: {st.state} ({plural(len(st.nodes), 'node')}, {plural(st.world_size, 'rank')}, "
             f"{st.hosts}{', ' + attempt if attempt else ''}{replaced})"]
    if st.slurm is not None:
        lines.append(st.slurm.text())
    w = max(4, *(len(n.node) for n in st.nodes))
    lines.append(f"{'node':<{w}}  node_rank  ranks      state")
    for n in st.nodes:
        ranks = str(n.first_rank) if n.first_rank == n.last_rank else f"{n.first_rank}-{n.last_rank}"
        lines.append(f"{n.node:<{w}}  {n.node_rank:>9}  {ranks:<9}  {describe_node(n)}")
    if st.state in (RunState.RUNNING, RunState.STARTING):
        quiet = [f"{g}: {_ago(q)}" for n in st.nodes for g, q in n.quiet.items()]
        lines.append("quiet for (rank: time since its last line): " + ", ".join(quiet))
    if st.hang:
        lines.append(f"hang: {st.hang.diagnosis} (stacks: {st.hang.stacks})")
    return lines


def ps() -> int:
    ids = list_run_ids()
    if not ids:
        print(f"no runs yet under {runs_root()}")
        return 0
    rows: list[tuple[str, RunDir, Plan | None]] = []
    for run_id in ids:
        run = RunDir(runs_root() / run_id)
        try:
            rows.append((run_id, run, run.plan()))
        except Exception:  # noqa: BLE001 - a damaged run must not hide the others
            rows.append((run_id, run, None))
    # A column for the Slurm job only where a run is on Slurm: other listings stay as they were.
    subs = {run_id: sub for run_id, run, p in rows if p is None and (sub := unplanned(run)) is not None}
    jobs = job_states([j for _, _, p in rows if p is not None and (j := p.slurm_job)]
                      + [sub.job for sub in subs.values() if sub.job])
    slurm_w = max([len("slurm job")] + [len(_slurm_cell(s)) for s in jobs.values()])
    slurm_head = f"{'slurm job':<{slurm_w}}  " if jobs else ""
    lines: list[tuple[str, str, str | None]] = []   # run id, state, the rest of the row (None: unreadable)
    for run_id, run, plan in rows:
        sub = subs.get(run_id)
        if sub is not None:         # submitted, not planned yet: no nodes or ranks to count
            state, _ = unplanned_state(run, sub, jobs.get(sub.job))
            cell = f"{_slurm_cell(jobs[sub.job]) if sub.job in jobs else '':<{slurm_w}}  "
            print(f"{run_id:<22}  {state:<14}  {'-':>5}  {'-':>5}  {cell}{' '.join(sub.script)}")
            continue
        try:
            if plan is None:
                raise ValueError(f"run {run_id}: no readable plan")
            states, records = run.node_states(), run.attempts()
        except Exception:  # noqa: BLE001 - a damaged run must not hide the others
            lines.append((run_id, "unreadable", None))
            continue
        state = run_state(len(plan.nodes), states)
        label = str(state)
        if state in (RunState.STARTING, RunState.RUNNING):
            lock = run.lock()
            if lock is not None:    # nobody is watching it; `clusterrun status` looks
                lock.release()
                label += "?"
        if records and records[-1].max_restarts:
            label += ", " + attempt_text(plan.attempt, records[-1].max_restarts)
        argv = plan.nodes[0].argv
        script = argv[argv.index("-u") + 1:]      # the entry: python -u SCRIPT ARGS
        job = plan.slurm_job
        cell = f"{_slurm_cell(jobs[job]) if job else '':<{slurm_w}}  " if jobs else ""
        lines.append((run_id, label, f"{len(plan.nodes):>5}  {plan.world_size:>5}  {cell}{' '.join(script)}"))
    state_w = max([14] + [len(label) for _, label, _ in lines])
    print(f"{'run':<22}  {'state':<{state_w}}  nodes  ranks  {slurm_head}script")
    for run_id, label, rest in lines:
        print(f"{run_id:<22}  {label:<{state_w}}" + (f"  {rest}" if rest is not None else ""))
    return 0


def _slurm_cell(st: JobState) -> str:
    """ps's `slurm job` column: `14 RUNNING`, `14 PENDING (Resources)`, or `14 ?` when Slurm cannot tell."""
    if st.state is None:
        return f"{st.job} ?"
    return f"{st.job} {st.state}" + (f" ({st.reason})" if st.reason else "")
