"""What each node has (Python, torch, CUDA, NCCL, driver, GPUs), and what in it stops a run.

The node agent's probe reports it (nodeagent.probe: the GPUs from nvidia-smi, the
versions from torch); `Inventory.from_probe` reads that report once. `node_problems`
says what keeps one node from running its part of a plan, and `mismatches` what differs
between the nodes in a way that breaks or hangs a job. `check` shows all of it, and
`up`'s preflight refuses to start on any of it (run/preflight.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..gpus import VISIBLE_VAR, missing_devices, parse_visible
from ..plan import NodePlan


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total: int | None        # MiB
    memory_used: int | None         # MiB, by every process on it


@dataclass(frozen=True)
class GpuProcess:
    """A process that holds GPU memory (nvidia-smi's compute apps)."""

    gpu: int | None
    pid: int
    memory: int | None              # MiB
    name: str


@dataclass(frozen=True)
class Inventory:
    """One node as its probe found it. None: not known (not installed, not reported)."""

    python: str | None = None
    torch: str | None = None
    cuda: str | None = None                 # the CUDA torch was built for (torch.version.cuda)
    nccl: str | None = None
    smi_found: bool = False                 # nvidia-smi is on the node's PATH
    smi_error: str | None = None            # it is, but it failed
    driver: str | None = None
    driver_cuda: str | None = None          # the newest CUDA the driver runs
    gpus: tuple[Gpu, ...] = ()
    processes: tuple[GpuProcess, ...] | None = None
    ifname: str | None = None               # the interface that reaches MASTER_ADDR

    @classmethod
    def from_probe(cls, r: dict[str, Any]) -> Inventory:
        versions = r.get("versions") or {}
        smi = r.get("smi") or {}
        procs = smi.get("processes")
        return cls(
            python=r.get("python"),
            torch=r.get("torch") or versions.get("torch"),
            cuda=versions.get("cuda"),
            nccl=versions.get("nccl"),
            smi_found=bool(smi.get("found")),
            smi_error=smi.get("error"),
            driver=smi.get("driver"),
            driver_cuda=smi.get("driver_cuda"),
            gpus=tuple(Gpu(g["index"], g.get("name") or "?", g.get("memory_total"), g.get("memory_used"))
                       for g in smi.get("gpus", ())),
            processes=None if procs is None else tuple(
                GpuProcess(p.get("gpu"), p["pid"], p.get("memory"), p.get("name") or "?") for p in procs),
            ifname=r.get("ifname"),
        )

    @property
    def count(self) -> int:
        """How many GPUs the node has (0 without nvidia-smi)."""
        return len(self.gpus)

    def model(self) -> str:
        """`2 x NVIDIA H100 80GB HBM3`; models joined when a node mixes them."""
        names = Counter(g.name for g in self.gpus)
        return ", ".join(f"{n} x {name}" for name, n in names.items())

    def why_none(self) -> str:
        """Why the node shows no GPU, in words."""
        if not self.smi_found:
            return "nvidia-smi is not on its PATH"
        if self.smi_error:
            return self.smi_error
        return "nvidia-smi lists none"


def visible(node: NodePlan, inv: Inventory) -> tuple[int, ...]:
    """The GPU indices the node's processes can use: its `gpus:`, else those of a
    CUDA_VISIBLE_DEVICES the user set (that the node has), else all of them."""
    have = [g.index for g in inv.gpus]
    if node.host.gpus is not None:
        return tuple(i for i in node.host.gpus if i in have)
    user = node.env.get(VISIBLE_VAR)
    listed = parse_visible(user) if user is not None else None
    if listed is not None:
        return tuple(i for i in listed if i in have)
    return tuple(have)


def node_problems(node: NodePlan, inv: Inventory) -> list[str]:
    """What keeps this node from running its part: GPUs it lacks, a driver too old."""
    problems = []
    count = len(visible(node, inv))
    if node.host.gpus is not None:
        lacking = missing_devices(node.host.gpus, inv.count)
        if lacking:
            problems.append(lacking + ("" if inv.count else f" ({inv.why_none()})"))
    elif node.gpu_count_pending:
        lacking = count_problem(node, inv)
        if lacking:
            problems.append(lacking)
    elif not node.gpu_count_pending and 0 < count < node.nproc:
        problems.append(f"{count} GPU{'s' if count != 1 else ''} < nproc_per_node {node.nproc}"
                        + (f" ({VISIBLE_VAR}={node.env[VISIBLE_VAR]})" if VISIBLE_VAR in node.env else ""))
    if inv.count and inv.cuda and inv.driver_cuda and _major(inv.driver_cuda) < _major(inv.cuda):
        problems.append(f"driver {inv.driver or '?'} runs CUDA up to {inv.driver_cuda}, but torch is built "
                        f"for CUDA {inv.cuda} (update the driver, or install a torch for CUDA "
                        f"{_major(inv.driver_cuda)})")
    return problems


def count_problem(node: NodePlan, inv: Inventory) -> str | None:
    """Why a `gpu` node has no GPU to count, or None when it has some."""
    if not node.gpu_count_pending or gpu_count(node, inv):
        return None
    if inv.count:
        why = f"none of its {inv.count} is in {VISIBLE_VAR}={node.env.get(VISIBLE_VAR)}"
    else:
        why = inv.why_none()
    return f"nproc_per_node is `gpu`, but the node has no GPU ({why})"


def gpu_count(node: NodePlan, inv: Inventory) -> int:
    """The count `nproc_per_node: gpu` stands for on this node."""
    return len(visible(node, inv))


def held(node: NodePlan, inv: Inventory) -> list[GpuProcess]:
    """The processes that hold memory on the GPUs this node's processes would use."""
    mine = set(visible(node, inv))
    return [p for p in inv.processes or () if p.gpu is None or p.gpu in mine]


def held_text(p: GpuProcess) -> str:
    where = "a GPU" if p.gpu is None else f"GPU {p.gpu}"
    mem = "" if p.memory is None else f"{p.memory} MiB "
    return f"{where}: {mem}in use by pid {p.pid} ({p.name})"


# What must be the same on every node: a difference in any of them breaks the job at
# start or hangs it in its first collective. (label, the part compared, the value shown)
_MUST_MATCH: tuple[tuple[str, Callable[[Inventory], str | None], Callable[[Inventory], str | None]], ...] = (
    ("torch", lambda i: i.torch, lambda i: i.torch),
    ("NCCL", lambda i: i.nccl, lambda i: i.nccl),
    ("torch's CUDA", lambda i: i.cuda and f"{_major(i.cuda)}.x", lambda i: i.cuda),
    ("Python", lambda i: i.python and ".".join(i.python.split(".")[:2]) + ".x", lambda i: i.python),
)


def mismatches(nodes: Sequence[tuple[NodePlan, Inventory]]) -> dict[int, list[str]]:
    """node_rank -> what differs there from the other nodes: torch or NCCL version, CUDA
    major version (torch's), Python minor version. The value most nodes have is taken as
    right (on a tie, the first node's); each node with another one is named."""
    out: dict[int, list[str]] = {}
    for label, key, shown in _MUST_MATCH:
        values = [(n, inv, v) for n, inv in nodes for v in [key(inv)] if v]
        right = _most_common([v for _, _, v in values])
        if right is None:
            continue
        where = _names([n for n, _, v in values if v == right])
        for n, inv, v in values:
            if v != right:
                out.setdefault(n.node_rank, []).append(f"{label} {shown(inv)} differs from {right} on {where}")
    return out


def driver_differences(nodes: Sequence[tuple[NodePlan, Inventory]]) -> dict[int, str]:
    """node_rank -> a note where the driver differs from most nodes' (not an error: NCCL
    works across driver versions, as long as each runs the CUDA torch is built for)."""
    values = [(n, inv.driver) for n, inv in nodes if inv.driver]
    right = _most_common([v for _, v in values])
    if right is None:
        return {}
    where = _names([n for n, v in values if v == right])
    return {n.node_rank: f"driver {v} differs from {right} on {where}" for n, v in values if v != right}


def _most_common(values: list[str]) -> str | None:
    """The value most nodes have (on a tie, the earliest), or None if all agree."""
    counts = Counter(values)
    if len(counts) < 2:
        return None
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _names(nodes: list[NodePlan]) -> str:
    names = [n.name for n in nodes]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0
