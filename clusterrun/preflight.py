"""Preflight: `clusterrun check`, and the cheap part of it that `up` runs before starting.

Each node's agent probes in parallel: python, the script, torch and torchrun,
GPUs, the interface that reaches MASTER_ADDR, and on the master node its port.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import EXIT_JOB_FAILED, EXIT_UNREACHABLE, ClusterrunError
from .hostsfile import load_hosts, with_transport
from .plan import LaunchOptions, NodePlan, Plan
from .parallel import each
from .remote import AgentError, run_agent
from .transport import Transport, connect_each


class PreflightError(ClusterrunError):
    """A node is not ready for the run (no python, no script, port in use)."""


@dataclass
class NodeCheck:
    node: NodePlan
    connect_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def probe_spec(plan: Plan, node: NodePlan, script: str | None, module: bool, port: int | str | None,
               torch: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"mode": "probe", "torch": torch, "master_addr": plan.master_addr}
    if script:
        spec.update(script=script, module=module)
    if node.node_rank == 0 and port is not None:
        spec["port"] = port
    return spec


def probe_all(plan: Plan, transports: Sequence[Transport | None], specs: Sequence[dict[str, Any]]
              ) -> list[dict[str, Any] | str]:
    """Each node's probe result, or the reason it could not run."""
    def one(i: int) -> dict[str, Any] | str:
        t = transports[i]
        if t is None:
            return "unreachable"
        try:
            return run_agent(plan.nodes[i], t, specs[i])
        except AgentError as e:
            return f"cannot run {plan.nodes[i].python}: {e}"

    # An error other than the agent's: the connection broke; report it for this node.
    return [o.value if o.error is None else f"{type(o.error).__name__}: {o.error}"  # type: ignore[misc]
            for o in each(range(len(plan.nodes)), one)]


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
    if r.get("port_free") is False:
        problems.append(f"{node.name}: master port {port} is already in use "
                        "(pick another with --master-port, or `auto`)")
    return problems


def preflight_error(problems: list[str]) -> PreflightError:
    return PreflightError("preflight failed, nothing was started:\n  " + "\n  ".join(problems)
                          + "\n(--skip-check skips these checks)")


def preflight(plan: Plan, transports: Sequence[Transport], opts: LaunchOptions, port: int | str) -> int | None:
    """Before anything starts, in a session of its own: python runs, the script is
    there, torch is installed, the master port is free. Raises PreflightError
    naming every node at fault. Returns the free port node 0 picked for "auto".
    (Without "auto", `up` runs the same checks inside the start: see Gate.)"""
    specs = [probe_spec(plan, n, opts.script, opts.module, port, torch=False) for n in plan.nodes]
    results = probe_all(plan, transports, specs)
    problems = [p for node, r in zip(plan.nodes, results) for p in node_problems(node, r, opts, port)]
    if problems:
        raise preflight_error(problems)
    first = results[0]
    return first.get("free_port") if isinstance(first, dict) else None


class Gate:
    """The preflight inside the start: each node's agent probes, then waits; once
    every node has answered, all of them start, or none does."""

    def __init__(self, plan: Plan, opts: LaunchOptions, port: int) -> None:
        self.plan, self.opts, self.port = plan, opts, port
        self._answers: dict[int, dict[str, Any] | str] = {}
        self._cv = threading.Condition()
        self.problems: list[str] | None = None

    def spec(self, node: NodePlan) -> dict[str, Any]:
        return probe_spec(self.plan, node, self.opts.script, self.opts.module, self.port, torch=False)

    def answer(self, node: NodePlan, r: dict[str, Any] | str) -> bool:
        """A node's probe (or why it has none); blocks until all answered: start?"""
        with self._cv:
            self._answers.setdefault(node.node_rank, r)
            self._cv.notify_all()
            self._cv.wait_for(lambda: len(self._answers) == len(self.plan.nodes))
            if self.problems is None:
                self.problems = [p for n in self.plan.nodes
                                 for p in node_problems(n, self._answers[n.node_rank], self.opts, self.port)]
            return not self.problems

    def wait(self) -> bool:
        with self._cv:
            self._cv.wait_for(lambda: self.problems is not None)
            return not self.problems


def auto_port(plan: Plan, transports: Sequence[Transport]) -> int:
    """A port that is free on node 0 right now (the kernel's pick)."""
    spec = {"mode": "probe", "torch": False, "port": "auto"}
    try:
        return int(run_agent(plan.nodes[0], transports[0], spec)["free_port"])
    except AgentError as e:
        raise PreflightError(f"{plan.nodes[0].name}: cannot run {plan.nodes[0].python}: {e}") from None


def check(hosts_path: str, accept_new: bool = False, transport: str | None = None) -> int:
    """`clusterrun check HOSTS`: every node in parallel, one row each."""
    from .launch import build_plan  # the same plan `up` would make

    hosts = with_transport(load_hosts(hosts_path), transport)
    conns = connect_each(hosts.hosts, hosts.connect_timeout, accept_new)
    try:
        first = conns[0][0]
        plan = build_plan(hosts, LaunchOptions(script="-"), "check", first.peer_addr if first else None,
                          port=0 if hosts.master_port == "auto" else None)
        port = hosts.master_port
        specs = [probe_spec(plan, n, None, False, port, torch=True) for n in plan.nodes]
        results = probe_all(plan, [t for t, _, _ in conns], specs)
    finally:
        for t, _, _ in conns:
            if t is not None:
                t.close()
    checks = [_evaluate(n, c, r, port) for n, c, r in zip(plan.nodes, conns, results)]
    versions = {c.info.get("torch") for c in checks if c.info.get("torch")}
    if len(versions) > 1:
        for c in checks:
            if c.info.get("torch"):
                c.problems.append(f"torch versions differ across nodes ({', '.join(sorted(versions))})")
    print(f"MASTER_ADDR {plan.master_addr}, master port {port}")
    _print_table(checks)
    failed = [c for c in checks if c.problems]
    for c in failed:
        print(f"clusterrun: {c.node.name}: " + "; ".join(c.problems))
    if any(c.connect_s is None for c in checks):
        return EXIT_UNREACHABLE
    return EXIT_JOB_FAILED if failed else 0


def _evaluate(node: NodePlan, conn: tuple, r: dict[str, Any] | str, port: int | str) -> NodeCheck:
    t, err, seconds = conn
    c = NodeCheck(node, seconds if t is not None else None)
    if t is None:
        c.problems.append(err.split(": ", 1)[-1] if err else "unreachable")
        return c
    if isinstance(r, str):
        c.problems.append(r)
        return c
    c.info = r
    if not r.get("torch"):
        c.problems.append(f"torch does not import: {r.get('torch_error', 'not installed')}")
    elif not r.get("torchrun"):
        c.problems.append(f"torch.distributed.run does not import: {r.get('torch_error')}")
    gpus = r.get("gpus")
    if gpus == 0 and r.get("torch"):
        c.notes.append("CPU only (gloo)")
    elif gpus is not None and gpus < node.nproc:
        c.problems.append(f"{gpus} GPUs < nproc_per_node {node.nproc}")
    if "ifname" in r and not r["ifname"]:
        c.problems.append("no interface reaches MASTER_ADDR")
    if r.get("port_free") is False:
        c.problems.append(f"master port {port} is in use")
    return c


def _print_table(checks: list[NodeCheck]) -> None:
    rows = [("node", "ssh", "python", "torch", "torchrun", "gpus", "interface", "master port", "status")]
    for c in checks:
        i = c.info
        gpus = "-" if "gpus" not in i else ("CPU only" if i["gpus"] == 0 else f"{i['gpus']}/{c.node.nproc}")
        port = "-"
        if "port_free" in i:
            port = "free" if i["port_free"] else "IN USE"
        elif "free_port" in i:
            port = f"auto ({i['free_port']})"
        rows.append((
            c.node.name,
            "-" if c.connect_s is None else f"{c.connect_s:.2f}s",
            i.get("python", "-"),
            i.get("torch") or "-",
            "-" if "torchrun" not in i else ("ok" if i["torchrun"] else "NO"),
            gpus,
            i.get("ifname") or "-",
            port,
            "FAIL" if c.problems else "ok",
        ))
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
