"""The nodes of the Slurm allocation a command runs in (HOSTS `slurm`, or a hosts file's `slurm:`).

Inside an allocation (salloc, sbatch) Slurm sets SLURM_JOB_ID and SLURM_JOB_NODELIST;
the nodes are `scontrol show hostnames $SLURM_JOB_NODELIST`, in that order, and a
node's node_rank is its position there. Each node's address (MASTER_ADDR for node 0)
is its NodeAddr from `scontrol show node`: the controller may not resolve node names.
hostsfile.allocation_hosts makes them Hosts on the srun transport (their sessions are
steps of that job). srun_argv is the line of such a step (transports/srun.py says why each
option), which the transport runs and `up --dry-run` prints. job_states tells `status` and `ps`
the state of a run's job. Outside an allocation `up` submits one (sbatch.py, run/submit.py).
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


def in_allocation() -> bool:
    """Whether this process runs inside a Slurm allocation (salloc, sbatch, srun)."""
    return bool(os.environ.get(JOB_VAR, "").strip())


def current_allocation(what: str) -> Allocation:
    """The allocation this process runs in (`what` names the HOSTS that asked for it)."""
    job = os.environ.get(JOB_VAR, "").strip()
    nodelist = os.environ.get(NODELIST_VAR, "").strip()
    if not job or not nodelist:
        raise UsageError(
            f"{what}: not inside a Slurm allocation (no ${JOB_VAR} / ${NODELIST_VAR}): run the "
            "command inside one, e.g. `salloc -N 2 --exclusive` then the command, or in an sbatch "
            "script (outside one, `clusterrun up` submits one with sbatch).")
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


# --- a step: one node's session (transports/srun.py), or a dry run's line by hand ---

# The environment sshd would give a session (its compiled-in default PATH), made
# on the node from the passwd entry, then the user's shell as a login shell.
# `sh -c LOGIN sh COMMAND`: COMMAND is $1, one argv word, never re-quoted.
LOGIN = ('p=$(getent passwd "$(id -u)") || { echo "no passwd entry for uid $(id -u)" >&2; exit 126; }; '
         'USER=${p%%:*}; LOGNAME=$USER; h=${p%:*}; HOME=${h##*:}; SHELL=${p##*:}; '
         'SHELL=${SHELL:-/bin/sh}; PATH=/usr/local/bin:/usr/bin:/bin; '
         'export USER LOGNAME HOME SHELL PATH; cd 2>/dev/null || cd /; '
         'exec "$SHELL" -l -c "$1"')
MERGE = "exec 2>&1; "


def srun_argv(node: str, jobid: str, command: str, *, merge_stderr: bool = False,
              srun: str = "srun", pty: bool = False) -> list[str]:
    """The srun line that runs one shell command line on `node`, in job `jobid`, as a
    login there would (why each option: transports/srun.py).

    pty: the task gets a terminal (`--pty`, for a line a person runs: Ctrl-C typed
    there reaches the task, as with `ssh -t`) instead of this process's stdin
    (`--input=all`, the transport's: srun refuses both at once)."""
    return [srun, f"--jobid={jobid}", "-N1", "-n1", f"--nodelist={node}", "--overlap",
            "--pty" if pty else "--input=all", "--export=NONE", "--chdir=/", "--mpi=none", "--quiet",
            "--job-name=clusterrun",
            "/bin/sh", "-c", (MERGE if merge_stderr else "") + LOGIN, "sh", command]


# --- the state of a run's Slurm job, for `status` and `ps` ---

_QUERY_TIMEOUT = 10.0       # status must answer even when slurmctld is slow


# Slurm's words for a job that has ended (squeue's %T, scontrol's JobState).
ENDED = frozenset(("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                   "DEADLINE", "OUT_OF_MEMORY"))
FORGOTTEN = "no longer known to Slurm (it ended)"


@dataclass(frozen=True)
class JobState:
    """A Slurm job's state as Slurm tells it now, next to the run's own state.

    `state` is Slurm's word (PENDING, RUNNING, COMPLETED, CANCELLED, ...), from
    `squeue`, else from `scontrol show job` (which keeps an ended job MinJobAge,
    300 s by default); None when neither knows it, `why` then says so. `reason`
    is Slurm's reason for a job not running (Resources, Priority, ...), if any.
    """

    job: str
    state: str | None
    reason: str = ""
    why: str = ""

    @property
    def ended(self) -> bool:
        """Slurm says the job has ended (and every step of it, with every process in them)."""
        return self.state in ENDED or (self.state is None and self.why == FORGOTTEN)

    def text(self) -> str:
        if self.state is None:
            return f"slurm job {self.job}: {self.why}"
        return f"slurm job {self.job}: {self.state}" + (f" ({self.reason})" if self.reason else "")

    def to_json(self) -> dict[str, str | None]:
        return {"job": self.job, "state": self.state, "reason": self.reason, "why": self.why}


def job_states(jobs: list[str]) -> dict[str, JobState]:
    """The state of each job: one `squeue` for all, `scontrol show job` for those it no
    longer lists. Never raises: what cannot be learnt is said in `why`."""
    wanted = list(dict.fromkeys(jobs))
    if not wanted:
        return {}
    found: dict[str, JobState] = {}
    squeue = shutil.which("squeue")
    if squeue is None:
        return {j: JobState(j, None, why="state not known here: no squeue on PATH") for j in wanted}
    # %i|%T|%r: id, state, reason. A single unknown id makes squeue fail ("Invalid job
    # id specified"); then each job is asked of scontrol.
    out = _query([squeue, "--noheader", f"--jobs={','.join(wanted)}", "--format=%i|%T|%r"])
    if isinstance(out, str):
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in wanted:
                found[parts[0]] = JobState(parts[0], parts[1], _reason(parts[2]))
    for j in wanted:
        if j not in found:
            found[j] = _scontrol_state(j)
    return found


def _scontrol_state(job: str) -> JobState:
    tool = shutil.which("scontrol")
    if tool is None:
        return JobState(job, None, why="state not known here: no scontrol on PATH")
    out = _query([tool, "show", "job", "--oneliner", job])
    if isinstance(out, str):
        state = re.search(r"(?:^|\s)JobState=(\S+)", out)
        reason = re.search(r"(?:^|\s)Reason=(\S+)", out)
        if state:
            return JobState(job, state.group(1), _reason(reason.group(1) if reason else ""))
        return JobState(job, None, why="state not known: `scontrol show job` gave no JobState")
    if "invalid job id" in out.message.lower():
        # Purged from slurmctld's memory (MinJobAge after its end); without accounting
        # (sacct) nothing more can be learnt.
        return JobState(job, None, why=FORGOTTEN)
    return JobState(job, None, why=f"state not known: {out.message}")


def _reason(reason: str) -> str:
    return "" if reason in ("None", "(null)", "") else reason


@dataclass(frozen=True)
class _Failed:
    message: str


def _query(argv: list[str]) -> "str | _Failed":
    """A Slurm client's stdout, or what went wrong, in one line."""
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=_QUERY_TIMEOUT)
    except subprocess.TimeoutExpired:
        return _Failed(f"`{shlex.join(argv)}` did not answer within {_QUERY_TIMEOUT:.0f}s")
    except OSError as e:
        return _Failed(f"`{shlex.join(argv)}`: {e}")
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return _Failed(f"`{os.path.basename(argv[0])}` failed: {why}")
    return out.stdout


# --- a node that Slurm says is gone ---

# Node states (scontrol's State=BASE+FLAG+...) that mean slurmd there does not answer:
# slurmctld sets NOT_RESPONDING when a ping fails, DOWN after SlurmdTimeout.
_GONE = frozenset(("DOWN", "NOT_RESPONDING", "FAIL"))


def node_gone(name: str) -> str | None:
    """Words saying that slurmctld holds this node for gone (not responding, down,
    failed), with its State and Reason; None when it does not, or cannot be asked
    (a lost answer is no proof of a lost node)."""
    tool = shutil.which("scontrol")
    if tool is None:
        return None
    out = _query([tool, "show", "node", "--oneliner", name])
    if not isinstance(out, str):
        return None
    state = re.search(r"(?:^|\s)State=(\S+)", out)
    if state is None or not _GONE & set(state.group(1).split("+")):
        return None
    reason = re.search(r"(?:^|\s)Reason=(.*?)(?=\s+\w+=|$)", out.strip())
    why = f" ({reason.group(1)})" if reason and _reason(reason.group(1)) else ""
    return f"Slurm says the node is {state.group(1)}{why}"
