"""The spec each node agent mode is started with, built here only.

The types are the agent's own (clusterrun/nodeagent.py, "the protocol"), so mypy
checks every field the controller sends against what the agent reads.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..nodeagent import (AttachSpec, KillSpec, Mode, ProbeCheck, ProbeSpec, StacksSpec, StartSpec,
                         SyncSpec)
from ..plan import NodePlan


def start_spec(node: NodePlan, master_addr: str, check: ProbeCheck | None = None) -> StartSpec:
    """Start the node's torchrun and stream it; with a check, probe first and start only on GO."""
    spec = StartSpec(mode=Mode.START, job_dir=node.job_dir, argv=list(node.argv), env=dict(node.env),
                     python=node.python, pick_ifname=list(node.pick_ifname), master_addr=master_addr,
                     marker=node.marker)
    if check is not None:
        spec["check"] = check
    return spec


def attach_spec(node: NodePlan, offsets: Mapping[str, int], follow: bool) -> AttachSpec:
    """Stream the node's job from these byte offsets (per output file); follow: to its end."""
    return AttachSpec(mode=Mode.ATTACH, job_dir=node.job_dir, offsets=dict(offsets), follow=follow,
                      marker=node.marker)


def kill_spec(node: NodePlan, grace: float) -> KillSpec:
    """TERM the node's job, KILL what is left after grace seconds."""
    return KillSpec(mode=Mode.KILL, job_dir=node.job_dir, marker=node.marker, grace=grace)


def stacks_spec(node: NodePlan, local_ranks: Sequence[int] | None, native: bool, children: bool,
                full: bool = True) -> StacksSpec:
    """The stacks of these local ranks (None: all) of the node's job; full: a dump that
    faulthandler cut at 100 frames is asked again for every frame (up to 2 s more)."""
    return StacksSpec(mode=Mode.STACKS, job_dir=node.job_dir, marker=node.marker,
                      local_ranks=None if local_ranks is None else list(local_ranks),
                      native=native, children=children, full=full)


def probe_check(*, torch: bool, master_addr: str | None = None, inventory: bool = False,
                env: Mapping[str, str] | None = None, script: str | None = None, module: bool = False,
                port: int | str | None = None) -> ProbeCheck:
    """What a probe looks at (see nodeagent.probe); fields left out are not looked at."""
    check = ProbeCheck(mode=Mode.PROBE, torch=torch)
    if master_addr is not None:
        check["master_addr"] = master_addr
    if inventory:
        check["inventory"] = True
    if env is not None:
        check["env"] = dict(env)
    if script:
        check["script"] = script
        check["module"] = module
    if port is not None:
        check["port"] = port
    return check


def probe_spec(node: NodePlan, check: ProbeCheck) -> ProbeSpec:
    """The probe as a mode of its own (`check`, the preflight, the auto port)."""
    return ProbeSpec(**check, job_dir=node.job_dir)


def sync_spec(node: NodePlan) -> SyncSpec:
    """Receive the workdir's changed files (the exchange on stdin follows)."""
    return SyncSpec(mode=Mode.SYNC, job_dir=node.job_dir)
