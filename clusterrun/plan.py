"""The plan: a pure function from the hosts file and options to what every node runs.

The real run executes this plan and `--dry-run` prints it (dryrun.py), so the two
cannot drift. Nothing here connects, reads the clock or touches disk.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from typing import Mapping

from .errors import UsageError
from .gpus import GPU, ORDER_VAR, VISIBLE_VAR, describe, visible_devices
from .hostsfile import Host, HostsFile
from .options import LaunchOptions

# Workers run as `sh -c 'exec "$0" "$@" 2>&1' python -u SCRIPT ARGS`: the shell
# replaces itself with the worker, so the process is exactly the user's script,
# but its stderr now shares stdout's file. One file per rank keeps the order of
# a rank's prints and its traceback exactly as the process wrote them.
MERGE_STDERR = ("sh", "-c", 'exec "$0" "$@" 2>&1')

# The interface each communication library binds to, chosen on the node (the one that
# reaches MASTER_ADDR) unless the user set it: gloo, NCCL, and TensorPipe, which
# torch.distributed.rpc uses and which otherwise takes the address the node's hostname
# resolves to, or 127.0.0.1 when it does not resolve. torch 2.x reads all three.
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")
JOB_MARKER_VAR = "CLUSTERRUN_JOB"
ATTEMPT_VAR = "CLUSTERRUN_ATTEMPT"          # 0, then 1, 2, ... after whole-job restarts


@dataclass(frozen=True)
class NodePlan:
    """Everything one node does for a run."""

    node_rank: int
    host: Host
    nproc: int
    rank_start: int                 # first global rank on this node (prefix sum)
    python: str
    workdir: str | None
    setup: tuple[str, ...]
    env: Mapping[str, str]          # set for torchrun and its workers, literally
    argv: tuple[str, ...]           # the torchrun command
    job_dir: str                    # node-side directory unique to run and node
    marker: str                     # CLUSTERRUN_JOB value: finds exactly this job's processes
    pick_ifname: tuple[str, ...]    # IFNAME_VARS the node must choose itself
    # nproc_per_node is `gpu` and the node's GPU count was not known when the plan was made
    # (only the dry run's plan): nproc is 0, and the ranks from this node on are unknown.
    gpu_count_pending: bool = False

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def ranks(self) -> range:
        return range(self.rank_start, self.rank_start + self.nproc)


@dataclass(frozen=True)
class Plan:
    run_id: str
    hosts_path: str
    master_addr: str
    master_port: int
    world_size: int
    nodes: tuple[NodePlan, ...]
    attempt: int = 0                # the whole job's restart count (up --max-restarts)

    @property
    def complete(self) -> bool:
        """Every node's process count is known (a dry run's plan may lack GPU counts)."""
        return not any(n.gpu_count_pending for n in self.nodes)

    @property
    def slurm_job(self) -> str | None:
        """The Slurm job whose steps run the nodes' parts (None: not a run on Slurm)."""
        return next((n.host.slurm_job for n in self.nodes if n.host.slurm_job), None)


def plan_from_dict(d: dict) -> Plan:
    """Rebuild a Plan from its JSON form (plan.json in the run's directory)."""
    nodes = []
    for n in d["nodes"]:
        h = dict(n["host"])
        h["setup"] = tuple(h.get("setup", ()))
        if h.get("gpus") is not None:
            h["gpus"] = tuple(h["gpus"])
        host = Host(**h)
        nodes.append(NodePlan(**{**n, "host": host, "setup": tuple(n["setup"]), "argv": tuple(n["argv"]),
                                 "pick_ifname": tuple(n["pick_ifname"])}))
    return Plan(**{**d, "nodes": tuple(nodes)})


def master_addr_for(hosts: HostsFile, connected_addr: str | None) -> str:
    """MASTER_ADDR: `master_addr`, else node 0's `addr`, else where ssh reached node 0."""
    first = hosts.hosts[0]
    if hosts.master_addr:
        return hosts.master_addr
    if first.addr:
        return first.addr
    if first.is_local:
        if any(not h.is_local for h in hosts.hosts):
            raise UsageError(
                f"{hosts.path}: node 0 is localhost but other nodes are remote: set `master_addr` "
                "(or node 0's `addr`) to an address the other nodes can reach"
            )
        return "127.0.0.1"
    if connected_addr:
        return connected_addr
    return first.host


def make_plan(
    hosts: HostsFile,
    opts: LaunchOptions,
    *,
    run_id: str,
    master_addr: str,
    master_port: int,
    gpu_counts: Mapping[int, int] | None = None,
    controller_python: str,
    local_home: str,
    attempt: int = 0,
) -> Plan:
    """Turn the hosts file and options into per-node commands.

    gpu_counts: node_rank -> the GPUs the node's processes can use, as the preflight
    found them, for the nodes whose nproc_per_node is `gpu`. A node missing from it
    gets `gpu_count_pending` (what the dry run shows as unknown)."""
    nodes: list[NodePlan] = []
    nnodes = len(hosts.hosts)
    rank_start = 0
    for node_rank, host in enumerate(hosts.hosts):
        nproc, pending = _nproc(host, opts, (gpu_counts or {}).get(node_rank))
        env = {**host.env, **opts.env}
        if host.gpus is not None:
            if VISIBLE_VAR in env:
                raise UsageError(f"{host.name}: `gpus:` sets {VISIBLE_VAR}, and --env sets it too: keep one")
            env[VISIBLE_VAR] = visible_devices(host.gpus)
            # CUDA numbers GPUs fastest first, nvidia-smi by PCI bus: this makes `gpus:` mean
            # the indices nvidia-smi shows, also on a machine with mixed models.
            env.setdefault(ORDER_VAR, "PCI_BUS_ID")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[ATTEMPT_VAR] = str(attempt)
        # Each attempt is a job of its own on the node: its own directory and marker.
        part = f"{node_rank}" if attempt == 0 else f"{node_rank}.a{attempt}"
        marker = f"{run_id}.{part}"
        env[JOB_MARKER_VAR] = marker
        python = host.python or controller_python
        # Nodes may share a home directory, so the path holds run id and node rank.
        home = local_home if host.is_local else "~/.clusterrun"
        job_dir = f"{home}/jobs/{run_id}/{part}"
        entry = (python, "-u", "-m", opts.script) if opts.module else (python, "-u", opts.script)
        argv = (
            python, "-m", "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            f"--nproc-per-node={GPU if pending else nproc}",     # gpu: torchrun counts them itself
            f"--master-addr={master_addr}",
            f"--master-port={master_port}",
            "--rdzv-backend=static",
            f"--rdzv-id={run_id}",
            "--max-restarts=0",
            log_dir_arg(job_dir),
            "--redirects=3",
            "--no-python",
            *MERGE_STDERR, *entry, *opts.script_args,
        )
        nodes.append(NodePlan(
            node_rank=node_rank, host=host, nproc=nproc, rank_start=rank_start,
            python=python, workdir=host.workdir, setup=host.setup, env=env, argv=argv,
            job_dir=job_dir, marker=marker,
            pick_ifname=tuple(v for v in IFNAME_VARS if v not in env),
            gpu_count_pending=pending,
        ))
        rank_start += nproc
    return Plan(run_id, hosts.path, master_addr, master_port, rank_start, tuple(nodes), attempt)


@dataclass(frozen=True)
class Facts:
    """What only the nodes can tell, from which an attempt's plan is made: where ssh
    reached node 0 (known once connected) and what the probe found (run/preflight.py)."""

    node0_addr: str | None = None       # MASTER_ADDR when neither `master_addr` nor `addr` says
    master_port: int | None = None      # node 0's pick for `master_port: auto`
    gpu_counts: Mapping[int, int] = field(default_factory=dict)    # node_rank -> GPUs, for `gpu` nodes


def asked_master_port(hosts: HostsFile, opts: LaunchOptions) -> int | str:
    """The port asked for: --master-port, else the hosts file; an int or "auto"."""
    return opts.master_port if opts.master_port is not None else hosts.master_port


def needs_probe(hosts: HostsFile, opts: LaunchOptions) -> bool:
    """Whether the plan needs a fact that only a probe of the nodes finds: node 0's
    free port for `master_port: auto`, or the GPU count of a `gpu` node."""
    return asked_master_port(hosts, opts) == "auto" or bool(needs_gpu_count(hosts, opts))


def build_plan(hosts: HostsFile, opts: LaunchOptions, facts: Facts, *, run_id: str, local_home: str,
               attempt: int = 0, provisional: bool = False) -> Plan:
    """The plan for these hosts from what the nodes told. A provisional plan (the dry
    run's, `check`'s, the one the probe starts each node's agent with) may lack the
    facts: an auto port not picked yet is 0, a GPU count not known is pending. A plan
    that runs lacks none; one without its auto port is a usage error."""
    asked = asked_master_port(hosts, opts)
    if asked != "auto":
        port = int(asked)
    elif facts.master_port is not None:
        port = facts.master_port
    elif provisional:
        port = 0
    else:
        raise UsageError("master_port is auto: it is picked on node 0 when the run starts")
    return make_plan(
        hosts, opts, run_id=run_id, master_addr=master_addr_for(hosts, facts.node0_addr), master_port=port,
        gpu_counts=facts.gpu_counts, controller_python=sys.executable, local_home=local_home, attempt=attempt,
    )


def _nproc(host: Host, opts: LaunchOptions, gpu_count: int | None) -> tuple[int, bool]:
    """A node's process count, and whether it is still unknown (`gpu`, not yet counted)."""
    asked = opts.nproc_per_node or host.nproc_per_node
    if asked != GPU:
        if host.gpus is not None and int(asked) > len(host.gpus):
            raise UsageError(f"{host.name}: --nproc-per-node {asked} is more than the {len(host.gpus)} "
                             f"GPU{'s' if len(host.gpus) != 1 else ''} of its `gpus: {describe(host.gpus)}`")
        return int(asked), False
    if host.gpus is not None:
        return len(host.gpus), False
    if gpu_count is None:
        return 0, True
    if gpu_count < 1:
        raise UsageError(f"{host.name}: nproc_per_node is `gpu`, but the node has no GPU")
    return gpu_count, False


def needs_gpu_count(hosts: HostsFile, opts: LaunchOptions) -> list[int]:
    """The node_ranks whose process count is their GPU count, which only the node can tell."""
    return [i for i, h in enumerate(hosts.hosts)
            if (opts.nproc_per_node or h.nproc_per_node) == GPU and h.gpus is None]


_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def is_secret(name: str) -> bool:
    """Env names that look like secrets (WANDB_API_KEY, HF_TOKEN, ...) are never shown."""
    upper = name.upper()
    return any(w in upper for w in _SECRET_WORDS)


def masked(env: Mapping[str, str]) -> dict[str, str]:
    return {k: "****" if is_secret(k) else v for k, v in env.items()}


def quote_path(path: str) -> str:
    """Quote a path for a POSIX shell, keeping a leading ~/ expandable."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def log_dir_arg(job_dir: str) -> str:
    return f"--log-dir={job_dir}/torchrun"


def setup_part(line: str) -> str:
    """One `setup:` entry as a part of an `A && B && ...` line. A block of several
    lines (YAML `|`), or a line with a `#` that might start a comment, becomes a
    brace group ending in a newline, so that neither a line break nor a comment
    runs into the `&&` that follows. (A group's status is its last command's.)"""
    text = line.strip("\n")
    if "\n" in text or "#" in text:
        return "{ " + text + "\n}"
    return text
