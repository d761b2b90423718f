"""`clusterrun check HOSTS`: every node probed in parallel, one row each.

The same probe as `up`'s preflight (preflight.py), on the same plan `up` would
make, plus torch's version compared across the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import EXIT_JOB_FAILED, EXIT_UNREACHABLE
from .hostsfile import load_hosts, with_transport
from .launch import build_plan
from .options import LaunchOptions
from .plan import NodePlan
from .preflight import probe_all, probe_spec
from .connect import connect_each


@dataclass
class NodeCheck:
    node: NodePlan
    connect_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check(hosts_path: str, accept_new: bool = False, transport: str | None = None) -> int:
    """`clusterrun check HOSTS`: every node in parallel, one row each."""
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
