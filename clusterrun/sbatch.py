"""The sbatch script of a submitted run: `clusterrun up` outside a Slurm allocation.

A pure function of the hosts file's `slurm:` section, the `--sbatch-arg` options and
what the submitting `up` knows (its run id, its words, its directory): no clock, no
disk, no Slurm. The script asks for the nodes (one task per node, holding the CPUs
the node's ranks need) and its batch step runs the run's controller in the
allocation: `clusterrun up --run-id=RUN ...` with the words the user typed, which
then starts every node's part with srun, as inside salloc. `up --dry-run` prints the
same script that `up` submits.

Two quotings, each applied once:
- `#SBATCH` lines are read by sbatch itself, not by a shell: a word is grouped by
  double quotes, in which only `\\` and `"` need a backslash (Slurm's
  `_get_argument`); `#` outside quotes would start a comment.
- The body is shell: every word through shlex.quote (shlex.join).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from .errors import UsageError
from .hostsfile import SlurmSpec

JOB_NAME = "clusterrun"
# The controller's environment in the batch step, beyond what Slurm gives it (its
# SLURM_* variables; --export=NONE: the user's login environment on the node, not
# the submitting shell's): where the runs are, and where the Slurm clients are.
PASSED_ENV = ("CLUSTERRUN_HOME", "PATH", "PYTHONPATH")
# sbatch options that decide the CPUs of each node's part: when the user gives one,
# clusterrun asks for none of its own.
_CPU_OPTIONS = re.compile(r"(--exclusive|--cpus-per-task|-c|--cpus-per-gpu|--ntasks-per-node|--mincpus)(=.*|\d*)",
                          re.ASCII)
_NODES_OPTION = re.compile(r"(--nodes|-N)(=.*|\d.*)?", re.ASCII)
_SAFE = re.compile(r"[A-Za-z0-9_.,:=/@%+-]+", re.ASCII)


@dataclass(frozen=True)
class BatchJob:
    """Everything the script says: the sbatch options, then the batch step's command."""

    run_id: str
    options: tuple[tuple[str, ...], ...]    # one #SBATCH line each: an option and its values
    env: tuple[tuple[str, str], ...]        # exported by the script before the controller
    argv: tuple[str, ...]                   # the batch step: the run's controller

    def script(self) -> str:
        lines = ["#!/bin/sh",
                 f"# clusterrun run {self.run_id}: the batch step is the run's controller, which starts",
                 "# every node's part with srun (one task per node) and writes the run's logs."]
        lines += ["#SBATCH " + " ".join(sbatch_word(w) for w in option) for option in self.options]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env]
        lines.append("exec " + shlex.join(self.argv))
        return "\n".join(lines) + "\n"


def sbatch_word(word: str) -> str:
    """One word of an `#SBATCH` line, as sbatch reads it back: `"a b"`, `"x \\"y\\""`."""
    if _SAFE.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def batch_job(spec: SlurmSpec, where: str, sbatch_args: tuple[str, ...], *, run_id: str, nproc: int | str,
              up_args: tuple[str, ...], python: str, workdir: str, output: str,
              env: dict[str, str]) -> BatchJob:
    """The job that runs `clusterrun up UP_ARGS` (HOSTS and all, as typed, less what
    only the submitting `up` uses) as the batch step of a new allocation.

    `where` names the hosts (`HOSTS slurm`, a file) in errors; `nproc` is the
    processes per node (a count, or "gpu"); `env` the submitting shell's environment,
    of which only PASSED_ENV is kept; `output` where the batch step's own words go.
    """
    user = tuple(spec.sbatch_args) + tuple(sbatch_args)
    for a in user:
        if "\n" in a or "\r" in a or "\x00" in a:
            raise UsageError(f"an sbatch option cannot hold a line break: {a!r}")
    user_nodes = any(_NODES_OPTION.fullmatch(a) for a in user)
    if spec.nodes is None and not user_nodes:
        raise UsageError(
            f"{where}: not inside a Slurm allocation, and nothing says how many nodes to submit "
            "for: give them in a hosts file (`slurm: {nodes: 2}`) or as `--sbatch-arg=--nodes=2`, "
            "or run inside an allocation (`salloc -N 2 --exclusive`, then the command)")
    options: list[tuple[str, ...]] = [(f"--job-name={JOB_NAME}",)]
    if spec.nodes is not None:
        options.append((f"--nodes={spec.nodes}",))
    options.append(("--ntasks-per-node=1",))
    if not any(_CPU_OPTIONS.fullmatch(a) for a in user):
        # The node's part (torchrun and its ranks) is one srun task: it gets the job's
        # CPUs on that node, which must be at least its ranks (the preflight checks).
        cpus = nproc if isinstance(nproc, int) else spec.gpus_per_node
        options.append((f"--cpus-per-task={cpus}",) if cpus else ("--exclusive",))
    if spec.gpus_per_node is not None:
        options.append((f"--gpus-per-node={spec.gpus_per_node}",))
    for key, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account)):
        if value is not None:
            options.append((f"--{key}={value}",))
    # --no-kill: a node that goes down ends the run's attempt, not the job, so that the
    # controller can restart on the nodes left (or tell the loss) instead of dying with it.
    options += [("--no-kill",), ("--no-requeue",), ("--export=NONE",), (f"--chdir={workdir}",),
                (f"--output={output}",)]
    options += _grouped(user)
    passed = tuple((k, env[k]) for k in PASSED_ENV if env.get(k))
    argv = (python, "-m", "clusterrun", "up", f"--run-id={run_id}", *up_args)
    return BatchJob(run_id, tuple(options), passed, argv)


def _grouped(args: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The user's sbatch words, one #SBATCH line per option with the values after it
    (`["--account", "proj"]` stays one option)."""
    lines: list[list[str]] = []
    for a in args:
        if a.startswith("-") or not lines:
            lines.append([a])
        else:
            lines[-1].append(a)
    return [tuple(line) for line in lines]
