"""The nodes of the Slurm allocation a command runs in (HOSTS `slurm`, or a hosts file's `slurm:`).

Inside an allocation (salloc, sbatch) Slurm sets SLURM_JOB_ID and SLURM_JOB_NODELIST;
the nodes are `scontrol show hostnames $SLURM_JOB_NODELIST`, in that order, and a
node's node_rank is its position there. Each node's address (MASTER_ADDR for node 0)
is its NodeAddr from `scontrol show node`: the controller may not resolve node names.
hostsfile.allocation_hosts makes them Hosts on the srun transport (their sessions are
steps of that job). Submitting an allocation (sbatch) is not built yet.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from .errors import UsageError

JOB_VAR = "SLURM_JOB_ID"
NODELIST_VAR = "SLURM_JOB_NODELIST"


@dataclass(frozen=True)
class Allocation:
    """The Slurm job a command runs in: its id and its nodes (name, NodeAddr), in order."""

    job: str
    nodes: tuple[tuple[str, str], ...]


def current_allocation(what: str) -> Allocation:
    """The allocation this process runs in (`what` names the HOSTS that asked for it)."""
    job = os.environ.get(JOB_VAR, "").strip()
    nodelist = os.environ.get(NODELIST_VAR, "").strip()
    if not job or not nodelist:
        raise UsageError(
            f"{what}: not inside a Slurm allocation (no ${JOB_VAR} / ${NODELIST_VAR}): run the "
            "command inside one, e.g. `salloc -N 2 --exclusive` then the command, or in an sbatch "
            "script. Submitting a job from here is not built yet.")
    if not re.fullmatch(r"[0-9_]+", job):
        raise UsageError(f"${JOB_VAR} is not a Slurm job id: {job!r}")
    names = _scontrol("show", "hostnames", nodelist).split()
    if not names:
        raise UsageError(f"`scontrol show hostnames {nodelist}` names no node")
    addrs = node_addrs(names)
    return Allocation(job, tuple((n, addrs[n]) for n in names))


def node_addrs(names: list[str]) -> dict[str, str]:
    """Each node's NodeAddr, from one `scontrol show node --oneliner NODES`."""
    out = _scontrol("show", "node", "--oneliner", ",".join(names))
    addrs: dict[str, str] = {}
    for line in out.splitlines():
        name = re.search(r"(?:^|\s)NodeName=(\S+)", line)
        addr = re.search(r"(?:^|\s)NodeAddr=(\S+)", line)
        if name and addr:
            addrs[name.group(1)] = addr.group(1)
    missing = [n for n in names if n not in addrs]
    if missing:
        raise UsageError(f"`scontrol show node` gives no NodeAddr for {' '.join(missing)}")
    return addrs


def _scontrol(*args: str) -> str:
    tool = shutil.which("scontrol")
    if tool is None:
        raise UsageError("HOSTS slurm needs the Slurm client `scontrol`, and it is not on PATH")
    argv = [tool, *args]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise UsageError(f"`{shlex.join(argv)}` did not answer within 30s") from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        raise UsageError(f"`{shlex.join(argv)}` failed: {why}")
    return out.stdout
