"""`clusterrun status` and `clusterrun ps`: what each run and each of its nodes is doing."""

from __future__ import annotations

import json
import time
from typing import Any

from ..run.controller import collect
from ..options import WatchOptions
from ..model import FINAL_STATES, NodeState, RunState
from ..run.runs import RunDir, list_run_ids, runs_root
from ..run.results import describe_code, describe_ranks, plural
from ..run.stream import Terminal


def run_state(plan_nodes: int, states: dict[int, dict[str, Any]]) -> RunState:
    """The run's state, from its nodes' states."""
    if len(states) < plan_nodes or any(s["state"] == NodeState.STARTING for s in states.values()):
        return RunState.STARTING
    if any(s["state"] not in FINAL_STATES for s in states.values()):
        return RunState.RUNNING
    if any(s["state"] == NodeState.KILLED for s in states.values()):
        return RunState.KILLED
    if all(s["state"] == NodeState.EXITED and s.get("code") == 0 for s in states.values()):
        return RunState.SUCCEEDED
    return RunState.FAILED


def status_data(run: RunDir, opts: WatchOptions) -> dict[str, Any]:
    if not run.ended():
        # Nobody may be watching the run (its `up` was killed): look at the nodes.
        collect(run, Terminal(), opts.quiet(), follow=False)
    plan, states = run.plan(), run.node_states()
    now = time.time()
    nodes = []
    for n in plan.nodes:
        s = states.get(n.node_rank, {"state": NodeState.STARTING})
        nodes.append({
            "node": n.name, "host": n.host.host, "node_rank": n.node_rank,
            "ranks": [n.ranks.start, n.ranks.stop - 1], "state": s["state"],
            "code": s.get("code"), "message": s.get("message", ""), "stopped": s.get("stopped", False),
            "failures": s.get("failures", []),
            "quiet": {str(g): _quiet(run, g, now) for g in n.ranks},
        })
    records = run.attempts()
    return {"run": plan.run_id, "state": run_state(len(plan.nodes), states),
            "hosts": plan.hosts_path, "world_size": plan.world_size, "nodes": nodes,
            "hang": run.read_json("hang.json"), "attempt": plan.attempt,
            "max_restarts": records[-1]["max_restarts"] if records else 0,
            "replaced": records[-1]["replaced"] if records else {}}


def attempt_text(attempt: int, max_restarts: int) -> str:
    """`attempt 2/3` for a run with restarts, else nothing."""
    return f"attempt {attempt + 1}/{max_restarts + 1}" if max_restarts else ""


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


def describe_node(n: dict[str, Any]) -> str:
    state = n["state"]
    if state == NodeState.EXITED:
        failures = n.get("failures", [])
        if n.get("stopped") and n["code"] != 0 and all(f.get("stopped") for f in failures):
            return "stopped"        # by clusterrun, after another node failed: as the summary says
        oom = [f["rank"] for f in failures if f.get("oom")]
        return describe_code(n["code"]) + (f" ({describe_ranks(oom)} out of memory)" if oom else "")
    if n.get("message"):
        return f"{state}: {n['message']}"
    return state


def status(run_id: str | None, as_json: bool, opts: WatchOptions) -> int:
    data = status_data(RunDir.find(run_id), opts)
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    attempt = attempt_text(data["attempt"], data["max_restarts"])
    replaced = "".join(f", {spare} in place of {lost}" for spare, lost in data["replaced"].items())
    print(f"run {data['run']}: {data['state']} ({plural(len(data['nodes']), 'node')}, "
          f"{plural(data['world_size'], 'rank')}, "
          f"{data['hosts']}{', ' + attempt if attempt else ''}{replaced})")
    w = max(4, *(len(n["node"]) for n in data["nodes"]))
    print(f"{'node':<{w}}  node_rank  ranks      state")
    for n in data["nodes"]:
        first, last = n["ranks"]
        ranks = str(first) if first == last else f"{first}-{last}"
        print(f"{n['node']:<{w}}  {n['node_rank']:>9}  {ranks:<9}  {describe_node(n)}")
    if data["state"] in (RunState.RUNNING, RunState.STARTING):
        quiet = [f"{g}: {_ago(q)}" for n in data["nodes"] for g, q in n["quiet"].items()]
        print("quiet for (rank: time since its last line): " + ", ".join(quiet))
    if data["hang"]:
        print(f"hang: {data['hang']['diagnosis']} (stacks: {data['hang']['stacks']})")
    return 0


def ps() -> int:
    ids = list_run_ids()
    if not ids:
        print(f"no runs yet under {runs_root()}")
        return 0
    print(f"{'run':<22}  {'state':<14}  nodes  ranks  script")
    for run_id in ids:
        run = RunDir(runs_root() / run_id)
        try:
            plan = run.plan()
        except Exception:  # noqa: BLE001 - a damaged run must not hide the others
            print(f"{run_id:<22}  {'unreadable':<14}")
            continue
        state = run_state(len(plan.nodes), run.node_states())
        if state in (RunState.STARTING, RunState.RUNNING):
            lock = run.lock()
            if lock is not None:    # nobody is watching it; `clusterrun status` looks
                lock.release()
                state += "?"
        records = run.attempts()
        if records and records[-1]["max_restarts"]:
            state += " " + attempt_text(plan.attempt, records[-1]["max_restarts"]).split()[1]
        argv = plan.nodes[0].argv
        script = argv[argv.index("-u") + 1:]      # the entry: python -u SCRIPT ARGS
        print(f"{run_id:<22}  {state:<14}  {len(plan.nodes):>5}  {plan.world_size:>5}  {' '.join(script)}")
    return 0
