"""Preflight: the probe of every node that `up` runs before starting (and `check` shows).

Each node's agent probes in parallel: python, the script, torch and torchrun,
GPUs, the interface that reaches MASTER_ADDR, and on the master node its port.
`judge` turns the answers into what stops the run (each with its node), warnings,
the port node 0 picked and the GPU counts of `nproc_per_node: gpu`.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ClusterrunError
from .inventory import Inventory, count_problem, gpu_count, held, held_text, mismatches
from .inventory import node_problems as inventory_problems
from ..options import LaunchOptions
from ..plan import Facts, NodePlan, Plan
from ..parallel import TimedOut, each
from ..nodeagent import ProbeCheck
from . import agentspec
from .remote import AgentError, Session, run_agent
from .startlimit import late_text, start_timeout_error, waiting_text
from ..transports.base import Transport


class PreflightError(ClusterrunError):
    """A node is not ready for the run (no python, no script, port in use)."""


def probe_spec(plan: Plan, node: NodePlan, script: str | None, module: bool, port: int | str | None,
               torch: bool) -> ProbeCheck:
    """What the preflight asks of a node. Only node 0 checks the master port."""
    # The node's env goes along for nvidia-smi: the PATH the job gets is where it is looked for.
    return agentspec.probe_check(torch=torch, master_addr=plan.master_addr, inventory=True, env=node.env,
                                 script=script, module=module, port=port if node.node_rank == 0 else None)


def probe_all(plan: Plan, transports: Sequence[Transport | None], specs: Sequence[ProbeCheck],
              limit: float | None = None, progress: Callable[[str], None] | None = None
              ) -> tuple[list[dict[str, Any] | str], list[tuple[str, str]]]:
    """Each node's probe result, or the reason it could not run; and the nodes that had not
    answered within `limit` seconds, with what they were doing (their setup is ended, their
    result says so). progress: told which nodes are still awaited, about every second."""
    sessions: list[Session | None] = [None] * len(plan.nodes)

    def one(i: int) -> dict[str, Any] | str:
        t = transports[i]
        if t is None:
            return "unreachable"
        sessions[i] = Session(plan.nodes[i], t)
        try:
            return run_agent(plan.nodes[i], t, agentspec.probe_spec(plan.nodes[i], specs[i]), sessions[i])
        except AgentError as e:
            return str(e)

    def tick(pending: list[int], seconds: float) -> None:
        if progress is not None and seconds >= 2:
            progress(waiting_text([plan.nodes[i].name for i in pending], seconds))

    outcomes = each(range(len(plan.nodes)), one, timeout=limit, tick=tick)
    late_ranks = [i for i, o in enumerate(outcomes) if isinstance(o.error, TimedOut)]

    def end(i: int) -> str:
        s = sessions[i]
        return s.end() if s is not None else "logging in"

    ended = each(late_ranks, end, timeout=30)
    late = [(plan.nodes[i].name, e.value or "logging in") for i, e in zip(late_ranks, ended)]
    doing = dict(zip(late_ranks, (d for _, d in late)))
    # An error other than the agent's: the connection broke; report it for this node.
    return [late_text(doing[i], limit or 0) if i in doing
            else o.value if o.error is None else f"{type(o.error).__name__}: {o.error}"  # type: ignore[misc]
            for i, o in enumerate(outcomes)], late


def node_problems(node: NodePlan, r: dict[str, Any] | str, opts: LaunchOptions, port: int | str) -> list[str]:
    """What keeps this node from starting the run, in words."""
    if isinstance(r, str):
        return [f"{node.name}: {r}"]
    problems = []
    if r.get("script_found") is False:
        what = "module" if opts.module else "script"
        problems.append(f"{node.name}: {what} {opts.script!r} not found in {r['cwd']} "
                        "(copy it there, or use --sync)")
    if not r.get("torch_found", True):
        problems.append(f"{node.name}: torch is not installed for {r['executable']} "
                        "(set `python:` or `setup:` in the hosts file)")
    cpus = step_cpus_problem(node, r)
    if cpus:
        problems.append(f"{node.name}: {cpus}")
    if r.get("port_free") is False:
        problems.append(f"{node.name}: master port {port} is already in use "
                        "(pick another with --master-port, or `auto`)")
    return problems


def step_cpus_problem(node: NodePlan, r: dict[str, Any]) -> str | None:
    """On Slurm: the node's step has fewer CPUs than the node's processes, in words with
    the fix (None: enough, or not on Slurm). `up` refuses such a node; `check` shows it."""
    cpus = r.get("cpus")
    if node.host.slurm_job and isinstance(cpus, int) and not node.gpu_count_pending and cpus < node.nproc:
        # Measured (Slurm 22.05): a step gets the job's CPUs on its node, and no more
        # (`-c` beyond them is refused): `salloc -N2` holds 1 CPU per node.
        return (f"the Slurm step gets {cpus} CPU{'s' if cpus != 1 else ''} "
                f"(job {node.host.slurm_job}'s share of the node), fewer than nproc_per_node "
                f"{node.nproc}: allocate whole nodes (`salloc --exclusive`) or CPUs per node "
                f"(`--ntasks-per-node={node.nproc}` or `-c {node.nproc}`)")
    return None


def preflight_error(problems: list[str], skippable: bool = True) -> PreflightError:
    return PreflightError("preflight failed, nothing was started:\n  " + "\n  ".join(problems)
                          + ("\n(--skip-check skips these checks)" if skippable else ""))


@dataclass
class Verdict:
    """What the probes of all nodes say about starting the run."""

    problems: list[str] = field(default_factory=list)     # "node: cause", in node order
    warnings: list[str] = field(default_factory=list)     # "node: ...": GPU memory held by others
    free_port: int | None = None                          # node 0's pick for an "auto" port
    gpu_counts: dict[int, int] = field(default_factory=dict)   # node_rank -> count, for `gpu` nodes


def judge(plan: Plan, results: Sequence[dict[str, Any] | str], opts: LaunchOptions, port: int | str,
          checks: bool = True) -> Verdict:
    """Every node's problems (its own, then how it differs from the others), or, with
    checks=False (--skip-check), only what the plan cannot do without: the GPU count of a
    `gpu` node."""
    per_node: list[list[str]] = [[] for _ in plan.nodes]
    pairs: list[tuple[NodePlan, Inventory]] = []
    v = Verdict()
    for node, r in zip(plan.nodes, results):
        mine = per_node[node.node_rank]
        if checks:
            mine += node_problems(node, r, opts, port)
        elif isinstance(r, str) and node.gpu_count_pending:
            mine.append(f"{node.name}: {r}")
        if not isinstance(r, dict):
            continue
        inv = Inventory.from_probe(r)
        pairs.append((node, inv))
        found = inventory_problems(node, inv) if checks else [p for p in [count_problem(node, inv)] if p]
        mine += [f"{node.name}: {p}" for p in found]
        v.warnings += [f"{node.name}: {held_text(p)}" for p in held(node, inv)]
        if node.gpu_count_pending and gpu_count(node, inv):
            v.gpu_counts[node.node_rank] = gpu_count(node, inv)
    if checks:
        for rank, found in mismatches(pairs).items():
            per_node[rank] += [f"{plan.nodes[rank].name}: {p}" for p in found]
    v.problems = [p for mine in per_node for p in mine]
    first = results[0] if results else None
    v.free_port = first.get("free_port") if isinstance(first, dict) else None
    return v


def preflight(plan: Plan, transports: Sequence[Transport], opts: LaunchOptions, port: int | str,
              checks: bool = True, limit: float | None = None,
              progress: Callable[[str], None] | None = None) -> Verdict:
    """Before anything starts, in a session of its own: python runs, the script is
    there, torch is installed, the master port is free, the GPUs are there and the
    nodes agree (versions). Raises PreflightError naming every node at fault. Returns
    the free port node 0 picked for "auto" and the GPU counts of `gpu` nodes.
    (Without "auto" or `gpu`, `up` runs the same checks inside the start: see Gate.)
    checks=False (--skip-check): only the port and the GPU counts. A node that has not
    answered within `limit` seconds (the start limit) ends it: StartTimeout."""
    specs = [probe_spec(plan, n, opts.script if checks else None, opts.module, port, torch=False)
             for n in plan.nodes]
    results, late = probe_all(plan, transports, specs, limit, progress)
    if late:
        raise start_timeout_error(late, limit or 0)
    verdict = judge(plan, results, opts, port, checks)
    if verdict.problems:
        raise preflight_error(verdict.problems, skippable=checks)
    return verdict


class Gate:
    """The preflight inside the start: each node's agent probes, then waits; once
    every node has answered, all of them start, or none does."""

    def __init__(self, plan: Plan, opts: LaunchOptions, port: int) -> None:
        self.plan, self.opts, self.port = plan, opts, port
        self._answers: dict[int, dict[str, Any] | str] = {}
        self._cv = threading.Condition()
        self.problems: list[str] | None = None
        self.warnings: list[str] = []

    def spec(self, node: NodePlan) -> ProbeCheck:
        return probe_spec(self.plan, node, self.opts.script, self.opts.module, self.port, torch=False)

    def answer(self, node: NodePlan, r: dict[str, Any] | str) -> bool:
        """A node's probe (or why it has none); blocks until all answered: start?"""
        with self._cv:
            self._answers.setdefault(node.node_rank, r)
            self._cv.notify_all()
            self._cv.wait_for(lambda: len(self._answers) == len(self.plan.nodes) or self.problems is not None)
            if self.problems is None:
                verdict = judge(self.plan, [self._answers[n.node_rank] for n in self.plan.nodes],
                                self.opts, self.port)
                self.warnings = verdict.warnings
                self.problems = verdict.problems
            return not self.problems

    def wait(self, timeout: float | None = None) -> bool | None:
        """Whether every node passed; None: not decided within timeout seconds."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.problems is not None, timeout):
                return None
            return not self.problems

    def pending(self) -> list[NodePlan]:
        """The nodes that have not answered yet (logging in, in setup, or probing)."""
        with self._cv:
            return [n for n in self.plan.nodes if n.node_rank not in self._answers]

    def abort(self, why: str) -> bool:
        """No node starts (Ctrl-C while the nodes are checked); False if it is too late:
        every node had answered and was told to start."""
        with self._cv:
            if self.problems is None:
                self.problems = [why]
                self._cv.notify_all()
            return self.problems != []


def find_facts(reach: Plan, transports: Sequence[Transport], opts: LaunchOptions, port: int | str,
               known: Facts, checks: bool = True, limit: float | None = None,
               progress: Callable[[str], None] | None = None) -> tuple[Facts, list[str]]:
    """What the plan needs that only the nodes can tell (node 0's free port for "auto",
    the GPU counts of `gpu` nodes), added to what is `known`, and the warnings. `reach`
    is the provisional plan that starts each node's agent: its nodes' python, workdir,
    setup and env do not depend on these facts. checks: the whole preflight comes along
    (PreflightError names every node at fault); without (--skip-check, or a restart whose
    spares were vetted), only what the plan cannot do without. Nothing to find: no probe
    (`up` then checks inside the start: see Gate)."""
    auto, counts = port == "auto", not reach.complete
    if not auto and not counts:
        return known, []
    if not checks and not counts:
        return dataclasses.replace(known, master_port=auto_port(reach, transports)), []
    verdict = preflight(reach, transports, opts, port, checks, limit, progress)
    found = dataclasses.replace(known, master_port=verdict.free_port if auto else known.master_port,
                                gpu_counts=verdict.gpu_counts)
    return found, verdict.warnings


def auto_port(plan: Plan, transports: Sequence[Transport]) -> int:
    """A port that is free on node 0 right now (the kernel's pick)."""
    spec = agentspec.probe_spec(plan.nodes[0], agentspec.probe_check(torch=False, port="auto"))
    try:
        return int(run_agent(plan.nodes[0], transports[0], spec)["free_port"])
    except AgentError as e:
        raise PreflightError(f"{plan.nodes[0].name}: {e}") from None
