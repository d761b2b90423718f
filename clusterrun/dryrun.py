"""`up --dry-run`: the plan as text, with one line per node that a user can paste.

Each node's line starts that node's share of the job by hand, in the terminal it is
pasted into: `ssh -t TARGET 'CMD'` for a remote node, `( CMD )` for a localhost one,
and on Slurm `srun --jobid=J ... --nodelist=NODE --overlap --pty ... sh CMD`, the step
that `clusterrun up` starts there (slurm.py's srun_argv), with a terminal.
CMD is what `clusterrun up` runs on the node, with the same ranks, environment,
python and script, less clusterrun's own machinery (the node agent, the per-rank
output files it streams from, the job directory and marker, the run id): torchrun
writes the workers' output to that terminal, and nothing is left on the node.

It is derived from the plan that the real run executes (`make_plan`), so the two
cannot drift apart. Nothing here connects, reads the clock or touches disk.
"""

from __future__ import annotations

import ipaddress
import shlex
from typing import Callable

from .gpus import ORDER_VAR, VISIBLE_VAR, describe
from .hostsfile import Host
from .login import Login
from .plan import MERGE_STDERR, JOB_MARKER_VAR, NodePlan, Plan, masked, quote_path
from .slurm import srun_argv

# make_plan needs a run id for the parts of a node's plan that only clusterrun's own
# machinery uses (job directory, marker, --rdzv-id): none of them is printed.
PLACEHOLDER_RUN_ID = "dry-run"

# What stands for an `auto` master port, which node 0 picks only when a real run starts.
# A plain word, so that a line pasted unchanged fails in torchrun's argument parser
# rather than as a shell redirection.
PORT_PLACEHOLDER = "PORT"

# torchrun options of the plan that serve only clusterrun's streaming and bookkeeping:
# its run id, the directory of per-rank output files, and sending output there.
_CLUSTERRUN_ONLY = ("--rdzv-id=", "--log-dir=", "--redirects=")


def render_plan(plan: Plan, *, port_auto: bool = False, start_dir: str | None = None,
                spares: tuple[Host, ...] = ()) -> str:
    """The rank table, then every node's line to run it by hand.

    port_auto: the plan's master port stands for `auto`; PORT is shown in its place.
    spares: the hosts that take a lost node's place; shown as spares, with no line."""
    job = plan.slurm_job
    n_nodes = len(plan.nodes)
    port = "auto (a free port on node 0, picked at start)" if port_auto else str(plan.master_port)
    w = max(4, *(len(n.name) for n in plan.nodes), *(len(h.name) for h in spares))
    world = plan.world_size if plan.complete else "?"
    where = f" of Slurm job {job}" if job else ""
    spared = f" (and {len(spares)} spare{'s' if len(spares) != 1 else ''})" if spares else ""
    lines = [
        f"{n_nodes} node{'s' if n_nodes != 1 else ''}{where}{spared}, world size {world}, "
        f"MASTER_ADDR={plan.master_addr} MASTER_PORT={port}",
        "",
        f"{'node':<{w}}  node_rank  nproc  global ranks  {'NodeAddr' if job else 'ssh target'}",
    ]
    for n in plan.nodes:
        target = n.host.addr if job else "(local, no ssh)" if n.host.is_local else n.host.host
        nproc = "?" if n.gpu_count_pending else n.nproc
        lines.append(f"{n.name:<{w}}  {n.node_rank:>9}  {nproc:>5}  {rank_text(plan, n):>12}  {target}")
    for h in spares:
        target = h.addr if job else "(local, no ssh)" if h.is_local else h.host
        lines.append(f"{h.name:<{w}}  {'spare':>9}  {'':>5}  {'':>12}  {target}")
    lines += ["", *explanation(plan, port_auto)]
    if job:
        return "\n".join(lines + slurm_lines(plan, port_auto=port_auto, spares=spares))
    for n in plan.nodes:
        lines += ["", node_heading(plan, n), node_line(plan, n, port_auto=port_auto, start_dir=start_dir)]
    return "\n".join(lines + spare_lines(spares))


def node_heading(plan: Plan, node: NodePlan) -> str:
    """`# node 1 (gpu-b): global ranks 3-4`, the comment above a node's line."""
    ranks = f"global rank{'s' if node.nproc != 1 else ''} {rank_text(plan, node)}"
    return f"# node {node.node_rank} ({node.name}): {ranks}"


def slurm_lines(plan: Plan, *, port_auto: bool = False, spares: tuple[Host, ...] = (),
                job: str | None = None) -> list[str]:
    """Per node of a plan on Slurm, a blank line, its heading and its srun line to run
    its part by hand from a shell of the job (slurm_node_line); then one comment per
    spare. job: the Slurm job the lines name, else the plan's."""
    lines: list[str] = []
    for n in plan.nodes:
        lines += ["", node_heading(plan, n), slurm_node_line(plan, n, port_auto=port_auto, job=job)]
    return lines + spare_lines(spares)


def spare_lines(spares: tuple[Host, ...]) -> list[str]:
    """A blank line, then a comment per spare: it has no line of its own."""
    return ["", *(f"# spare {h.name}: no line: it runs nothing until it takes a lost node's place "
                  "(clusterrun up, at a restart)" for h in spares)] if spares else []


def rank_text(plan: Plan, node: NodePlan) -> str:
    """`4-7`, `4`, or `?` where a GPU count before or on this node is known only at start."""
    if any(n.gpu_count_pending for n in plan.nodes[:node.node_rank + 1]):
        return "?"
    return f"{node.ranks.start}-{node.ranks.stop - 1}" if node.nproc > 1 else str(node.ranks.start)


def explanation(plan: Plan, port_auto: bool) -> list[str]:
    """The comment block between the table and the lines: how to use them, and what
    they leave out."""
    job = plan.slurm_job
    if job:
        text = [
            f"To run this job by hand, paste each line below into a shell of Slurm job {job} (the",
            "salloc or sbatch shell, or any shell whose srun reaches the job), each in a terminal of",
            "its own, all at about the same time: each starts one node's ranks in a step of the job",
            "on that node (--overlap: beside the steps already there; --pty: Ctrl-C typed in its",
            "terminal reaches torchrun), with the same environment, workdir and script as",
            "`clusterrun up`, and their output appears in that terminal. The step gets none of this",
            "shell's environment but Slurm's SLURM_* variables (--export=NONE); its shell makes a",
            "login's environment on the node (USER, HOME, PATH, your profile), as `clusterrun up` does.",
            "`clusterrun up` first checks that each step gets at least nproc_per_node CPUs; by hand,",
            "the ranks share the CPUs the step gets (see docs/slurm.md: --exclusive or -c).",
        ]
    else:
        text = [
            "To run this job by hand, paste each line below into a terminal of its own on this",
            "machine, all at about the same time: each starts one node's ranks with the same",
            "environment and script as `clusterrun up`, and their output appears in that terminal.",
        ]
    text += [
        "On the node, a line picks the interface that reaches MASTER_ADDR with `ip` (iproute2)",
        "for GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME and TP_SOCKET_IFNAME, unless already set.",
        "What `clusterrun up` adds to this: every line whole (here, ranks that share a terminal",
        "can splice theirs) and tagged with its node, global and local rank ([node g5 l1]);",
        "every node stopped when one fails (here, the others wait in their collectives until",
        "you press Ctrl-C there); every process on every node ended on Ctrl-C or",
        "`clusterrun kill`; logs and status under ~/.clusterrun/runs.",
    ]
    if port_auto:
        text += [f"master_port is auto: replace {PORT_PLACEHOLDER} in every line with one port free on node 0."]
    secrets = sorted({k for n in plan.nodes for k, v in masked(n.env).items() if v != n.env[k]})
    if secrets:
        text += [f"**** stands for the value of {', '.join(secrets)} (never printed): put it in before you paste."]
    return ["# " + t for t in text + gpu_notes(plan) + nccl_notes(plan)]


def gpu_notes(plan: Plan) -> list[str]:
    """What `gpu` counts and `gpus:` lists do to the plan, in words."""
    text = []
    pending = [n for n in plan.nodes if n.gpu_count_pending]
    if pending:
        text.append(f"? is known only at start: nproc_per_node is gpu on {_nodes_text(plan, pending)}, "
                    "one process per GPU, counted with nvidia-smi in the preflight; the global ranks "
                    "from there on follow from the counts. Pasted by hand, torchrun counts them itself "
                    "(--nproc-per-node=gpu).")
    for devices, nodes in _grouped(plan, lambda n: describe(n.host.gpus) if n.host.gpus else None):
        env = nodes[0].env
        order = f" and {ORDER_VAR}={env[ORDER_VAR]}" if ORDER_VAR in env else ""
        many = len(nodes[0].host.gpus or ()) > 1
        text.append(f"gpus: {_nodes_text(plan, nodes)} use{'s' if len(nodes) == 1 else ''} "
                    f"GPU{'s' if many else ''} {devices} ({VISIBLE_VAR}={env[VISIBLE_VAR]}{order}).")
    return text


def nccl_notes(plan: Plan) -> list[str]:
    """Which NCCL variables the user set (env:, --env) and which clusterrun sets, per node."""
    def words(n: NodePlan) -> str:
        mine = sorted(f"{k}={v}" for k, v in masked(n.env).items() if k.startswith("NCCL_"))
        ours = [v for v in n.pick_ifname if v.startswith("NCCL_")]
        return (f"set by you (env:, --env): {', '.join(mine) if mine else 'none'}; set by clusterrun: "
                + (f"{', '.join(ours)} (the interface that reaches MASTER_ADDR, picked on the node)" if ours
                   else "none"))

    return [f"NCCL on {_nodes_text(plan, nodes)}: {text}." for text, nodes in _grouped(plan, words)]


def _grouped(plan: Plan, key: Callable[[NodePlan], str | None]) -> list[tuple[str, list[NodePlan]]]:
    """Nodes grouped by a text that key gives them (nodes with none left out), in order."""
    groups: dict[str, list[NodePlan]] = {}
    for n in plan.nodes:
        k = key(n)
        if k:
            groups.setdefault(k, []).append(n)
    return list(groups.items())


def _nodes_text(plan: Plan, nodes: list[NodePlan]) -> str:
    if len(nodes) == len(plan.nodes) > 1:
        return "every node"
    return ", ".join(f"node {n.node_rank} ({n.name})" if n.host.is_local else n.name for n in nodes)


def node_line(plan: Plan, node: NodePlan, *, port_auto: bool = False, mask: bool = True,
              start_dir: str | None = None) -> str:
    """One line to paste into a terminal on the controller: `ssh -t TARGET 'CMD'`, or
    `( CMD )` for a localhost node (a subshell: its `cd` and variables stay in it), or
    on Slurm the srun line of slurm_node_line.

    `-t`: the remote command gets a terminal, so Ctrl-C in this one reaches torchrun,
    and a closed terminal hangs it up. (Without a local terminal ssh warns and goes on.)

    start_dir: the directory `up` was started in, where a localhost node runs (or
    where its relative workdir is); its line cds there first, so that it runs the
    same in any terminal it is pasted into."""
    if node.host.slurm_job:
        return slurm_node_line(plan, node, port_auto=port_auto, mask=mask)
    cmd = node_command(plan, node, port_auto=port_auto, mask=mask)
    if node.host.is_local:
        return f"( {_start_dir_step(node, start_dir)}{cmd} )"
    return f"{ssh_argv_text(node.host, tty=True)} {shlex.quote(cmd)}"


def slurm_node_line(plan: Plan, node: NodePlan, *, port_auto: bool = False, mask: bool = True,
                    job: str | None = None) -> str:
    """The srun line that runs a node of a plan on Slurm by hand, from a shell of its job
    (`job`, else the node's): the step `clusterrun up` starts there (srun_argv: --overlap,
    --export=NONE, a login's environment), running node_command, every word quoted once.

    `--pty` for `--input=all`: the task gets a terminal, so Ctrl-C in this one reaches
    torchrun (measured, Slurm 22.05: without it one Ctrl-C only makes srun print the
    step's state). Without a local terminal srun says it disregards --pty, and goes on."""
    job = job or node.host.slurm_job
    assert job, f"{node.name} is not a node of a Slurm job"
    cmd = node_command(plan, node, port_auto=port_auto, mask=mask)
    return shlex.join(srun_argv(node.name, job, cmd, pty=True))


def _start_dir_step(node: NodePlan, start_dir: str | None) -> str:
    """`cd START_DIR && ` for a localhost node whose directory depends on where `up`
    was started: no workdir, or a relative one. An absolute or ~ workdir needs none."""
    if start_dir is None or (node.workdir and node.workdir.startswith(("/", "~"))):
        return ""
    return f"cd {shlex.quote(start_dir)} && "


def node_command(plan: Plan, node: NodePlan, *, port_auto: bool = False, mask: bool = True) -> str:
    """The node's part as one POSIX shell line: `cd WORKDIR && { SETUP; } </dev/null && `,
    the interface pick, then `env K=V ... PYTHON -m torch.distributed.run ... SCRIPT ARGS`.

    Every value is quoted exactly once; secret-looking values show as **** unless mask
    is False."""
    env = {k: v for k, v in (masked(node.env) if mask else node.env).items() if k != JOB_MARKER_VAR}
    words = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    # A value set by `setup:` or the node's own environment wins, as in the node agent.
    words += [f'{var}="${{{var}:-$IF}}"' for var in node.pick_ifname]
    argv = manual_argv(node, PORT_PLACEHOLDER if port_auto else str(plan.master_port))
    # argv[0] is the node's python, which may be ~/...; everything else is quoted as is.
    torchrun = " ".join([quote_path(argv[0]), *(shlex.quote(a) for a in argv[1:])])
    pick = pick_interface(plan.master_addr) if node.pick_ifname else ""
    return Login(node.workdir, node.setup).shown_steps() + pick + "env " + " ".join(words + [torchrun])


def manual_argv(node: NodePlan, port: str) -> tuple[str, ...]:
    """The plan's torchrun argv without clusterrun's own parts: no --rdzv-id, --log-dir,
    --redirects, and no `--no-python sh -c ... python -u` wrapper, so that torchrun runs
    the script with its own python (the same one) and the workers write to its terminal.

    The plan's argv is `PY -m torch.distributed.run OPTS --no-python sh -c X PY -u ENTRY`."""
    argv = node.argv
    cut = argv.index("--no-python")
    assert argv[cut + 1:cut + 4] == MERGE_STDERR and argv[cut + 4:cut + 6] == (node.python, "-u"), argv
    options = [a for a in argv[3:cut] if not a.startswith(_CLUSTERRUN_ONLY)]
    options = [f"--master-port={port}" if a.startswith("--master-port=") else a for a in options]
    return (*argv[:3], *options, *argv[cut + 6:])


def pick_interface(master_addr: str) -> str:
    """Shell that sets IF, on the node, to the interface holding the address this node
    reaches master_addr from: the node agent's choice (`interface_to`), in iproute2.
    (`ip route get` alone would say `lo` on the node that holds master_addr.)
    A name is resolved on the node first, as the node would resolve it."""
    try:
        ipaddress.ip_address(master_addr)
        resolve, dest = "", shlex.quote(master_addr)
    except ValueError:
        resolve = f'MASTER_IP=$(getent ahosts {shlex.quote(master_addr)} | sed -n "1s/ .*//p") && '
        dest = '"$MASTER_IP"'
    return (resolve
            + f'SRC=$(ip -o route get {dest} | sed -n "s/.* src \\([^ ]*\\).*/\\1/p") && '
            + 'IF=$(ip -o addr show to "$SRC" | sed -n "1s/^[0-9]*: *\\([^ @]*\\).*/\\1/p") && ')


def ssh_argv_text(host: Host, *, tty: bool = False) -> str:
    """The plain `ssh` invocation equivalent to how clusterrun connects."""
    argv = ["ssh"]
    if tty:
        argv.append("-t")
    if host.port:
        argv += ["-p", str(host.port)]
    if host.identity_file:
        argv += ["-i", host.identity_file]
    if host.user:
        argv += ["-l", host.user]
    return shlex.join(argv + [host.host])
