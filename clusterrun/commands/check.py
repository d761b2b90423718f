"""`clusterrun check HOSTS`: every node probed in parallel, one row each.

The same probe as `up`'s preflight (run/preflight.py), on the same plan `up` would
make, with torch imported (so a broken install shows): an inventory of each node
(inventory.py) and every difference between the nodes that would break or hang a job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..transports.connect import connect_each
from ..errors import EXIT_JOB_FAILED, EXIT_UNREACHABLE
from ..gpus import describe
from ..hostsfile import load_hosts, with_transport
from ..run.inventory import Inventory, driver_differences, gpu_count, held, held_text, mismatches, node_problems
from ..options import LaunchOptions
from ..plan import Facts, NodePlan, build_plan
from ..run.preflight import probe_all, probe_spec, step_cpus_problem
from ..run.runs import clusterrun_home
from ..run.startlimit import CHECK_TIMEOUT
from ..run.stream import Terminal


@dataclass
class NodeCheck:
    node: NodePlan
    connect_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    inv: Inventory | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def nproc(self) -> int | None:
        """The node's process count; for `gpu`, the count found (None: not known)."""
        if not self.node.gpu_count_pending:
            return self.node.nproc
        return gpu_count(self.node, self.inv) if self.inv is not None else None


def check(hosts_path: str, accept_new: bool = False, transport: str | None = None,
          as_json: bool = False, timeout: float | None = None) -> int:
    """`clusterrun check HOSTS`: every node in parallel, one row each (or JSON). A node
    that has not answered within `timeout` (default CHECK_TIMEOUT) is a problem of its
    row ("in setup for 2m"), its setup ended; the others are shown as usual."""
    hosts = with_transport(load_hosts(hosts_path), transport)
    conns = connect_each(hosts.hosts, hosts.connect_timeout, accept_new)
    try:
        first = conns[0][0]
        plan = build_plan(hosts, LaunchOptions(script="-"), Facts(node0_addr=first.peer_addr if first else None),
                          run_id="check", local_home=str(clusterrun_home()), provisional=True)
        port = hosts.master_port
        specs = [probe_spec(plan, n, None, False, port, torch=True) for n in plan.nodes]
        term = Terminal()
        results, late = probe_all(plan, [t for t, _, _ in conns], specs, timeout or CHECK_TIMEOUT, term.progress)
        term.clear_progress()
    finally:
        for t, _, _ in conns:
            if t is not None:
                t.close()
    checks = [_evaluate(n, c, r, port) for n, c, r in zip(plan.nodes, conns, results)]
    pairs = [(c.node, c.inv) for c in checks if c.inv is not None]
    for rank, found in mismatches(pairs).items():
        checks[rank].problems += found
    for rank, note in driver_differences(pairs).items():
        checks[rank].warnings.append(note)
    nprocs = [c.nproc for c in checks]
    world = sum(n for n in nprocs if n) if all(nprocs) else None
    if as_json:
        print(json.dumps(_as_json(plan.master_addr, port, world, checks), indent=2))
    else:
        print(f"MASTER_ADDR {plan.master_addr}, master port {port}"
              + (f", world size {world}" if world is not None else ""))
        _print_table(checks)
        for c in checks:
            for w in c.warnings:
                print(f"clusterrun: warning: {c.node.name}: {w}")
        for c in checks:
            if c.problems:
                print(f"clusterrun: {c.node.name}: " + "; ".join(c.problems))
    if late or any(c.connect_s is None for c in checks):
        return EXIT_UNREACHABLE
    return EXIT_JOB_FAILED if any(c.problems for c in checks) else 0


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
    c.inv = Inventory.from_probe(r)
    if not r.get("torch"):
        c.problems.append(f"torch does not import: {r.get('torch_error', 'not installed')}")
    elif not r.get("torchrun"):
        c.problems.append(f"torch.distributed.run does not import: {r.get('torch_error')}")
    c.problems += node_problems(node, c.inv)
    cpus = step_cpus_problem(node, r)       # on Slurm, as `up` would refuse it
    if cpus:
        c.problems.append(cpus)
    if c.inv.smi_error and not c.problems:
        c.warnings.append(c.inv.smi_error)
    c.warnings += [held_text(p) for p in held(node, c.inv)]
    if "ifname" in r and not r["ifname"]:
        c.problems.append("no interface reaches MASTER_ADDR")
    if r.get("port_free") is False:
        c.problems.append(f"master port {port} is in use")
    return c


def _gpus_text(inv: Inventory) -> str:
    if inv.count:
        return inv.model()
    if inv.smi_error:
        return "nvidia-smi failed"
    return "CPU only"


def _nproc_text(c: NodeCheck) -> str:
    n = c.nproc
    text = "?" if n is None else str(n)
    if c.node.host.gpus is not None:
        text += f" on {describe(c.node.host.gpus)}"
    elif c.node.gpu_count_pending:
        text += " (gpu)"
    return text


def _held_text(c: NodeCheck) -> str:
    inv = c.inv
    if inv is None or not inv.count:
        return "-"
    if inv.processes is None:
        return "?"
    procs = held(c.node, inv)
    if not procs:
        return "-"
    mib = sum(p.memory or 0 for p in procs)
    pids = f"pid {procs[0].pid}" if len(procs) == 1 else f"{len(procs)} pids"
    return f"{mib / 1024:.1f} GiB, {pids}"


def _print_table(checks: list[NodeCheck]) -> None:
    rows = [("node", "ssh", "python", "torch", "torchrun", "cuda", "nccl", "driver", "gpus", "nproc",
             "in use by others", "interface", "master port", "status")]
    for c in checks:
        i, inv = c.info, c.inv
        port = "-"
        if "port_free" in i:
            port = "free" if i["port_free"] else "IN USE"
        elif "free_port" in i:
            port = f"auto ({i['free_port']})"
        driver = "-"
        if inv is not None and inv.driver:
            driver = inv.driver + (f" (CUDA {inv.driver_cuda})" if inv.driver_cuda else "")
        rows.append((
            c.node.name,
            "-" if c.connect_s is None else f"{c.connect_s:.2f}s",
            i.get("python", "-"),
            i.get("torch") or "-",
            "-" if "torchrun" not in i else ("ok" if i["torchrun"] else "NO"),
            (inv and inv.cuda) or "-",
            (inv and inv.nccl) or "-",
            driver,
            "-" if inv is None else _gpus_text(inv),
            "-" if inv is None else _nproc_text(c),
            _held_text(c),
            i.get("ifname") or "-",
            port,
            "FAIL" if c.problems else "ok",
        ))
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def _as_json(master_addr: str, port: int | str, world: int | None, checks: list[NodeCheck]) -> dict[str, Any]:
    nodes = []
    for c in checks:
        i, inv = c.info, c.inv
        d: dict[str, Any] = {"node": c.node.name, "node_rank": c.node.node_rank, "host": c.node.host.host,
                             "reachable": c.connect_s is not None, "connect_s": c.connect_s}
        if inv is not None:
            smi = "found" if inv.smi_found and not inv.smi_error else ("missing" if not inv.smi_found else "failed")
            d.update({
                "hostname": i.get("hostname"), "python": inv.python, "executable": i.get("executable"),
                "torch": i.get("torch"), "torchrun": i.get("torchrun"), "cuda": inv.cuda, "nccl": inv.nccl,
                "nvidia_smi": smi, "nvidia_smi_error": inv.smi_error,
                "driver": inv.driver, "driver_cuda": inv.driver_cuda,
                "gpu_count": inv.count, "gpu_model": inv.model() or None,
                "gpus": [vars(g) for g in inv.gpus],
                "gpu_processes": None if inv.processes is None else [vars(p) for p in inv.processes],
                "nproc": c.nproc, "nproc_per_node": c.node.host.nproc_per_node,
                "cuda_visible_devices": c.node.env.get("CUDA_VISIBLE_DEVICES"),
                "interface": i.get("ifname"), "cpus": i.get("cpus"),
            })
            if "port_free" in i:
                d["master_port_free"] = i["port_free"]
            if "free_port" in i:
                d["master_port_auto"] = i["free_port"]
        d.update(problems=c.problems, warnings=c.warnings, ok=not c.problems and c.connect_s is not None)
        nodes.append(d)
    return {"master_addr": master_addr, "master_port": port, "world_size": world,
            "ok": all(n["ok"] for n in nodes), "nodes": nodes}
