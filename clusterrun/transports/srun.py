"""srun transport: every session one Slurm job step on one node of an allocation.

A session is `srun --jobid=J -N1 -n1 -w NODE --overlap ... /bin/sh -c LOGIN sh COMMAND`,
run by the srun client on this machine (the controller; the line is
clusterrun/slurm.py's srun_argv, which `up --dry-run` prints too); the step's
stdin and stdout are the session's, as an ssh session's are. No connection is
held between sessions: each is a new step of the same job.

The shape, and why (measured on Debian's Slurm 22.05, scripts/slurmcluster, a
machine of 2 cores shared with other work; see FACTS below for the numbers):

- `--overlap`: every step shares the allocation's CPUs with the steps already
  running (the run's own, the batch script). Without it a second step on a
  busy node waits (../shared/slurm-lab reports "Requested nodes are busy").
- `-N1 -n1 --nodelist=NODE`: one task, on that node. `--input=all`: stdin goes to it.
- `--export=NONE`: the controller's environment is NOT copied onto the node
  (srun's default, ALL, would). Slurm then passes only the SLURM_* variables of
  the srun's own environment (SLURM_CONF among them, always: without it a
  Slurm client on the node tries a DNS SRV lookup) and sets the step's own
  (SLURM_JOB_ID, SLURM_STEP_ID, SLURMD_NODENAME, SLURM_CPU_BIND..., and
  SLURM_PROCID=0, SLURM_NODEID=0, SLURM_NTASKS=1: those describe this one-task
  step, not the run's ranks). Nothing else: no PATH, no HOME. LOGIN then makes
  the environment sshd would: USER, LOGNAME, HOME and SHELL from the passwd
  entry of the user the step runs as, PATH=/usr/local/bin:/usr/bin:/bin, the
  working directory HOME (else /), and runs COMMAND with the user's own shell
  as a login shell (`$SHELL -l -c COMMAND`), which reads /etc/profile and the
  user's profile (module systems, PATH), as `sbatch --get-user-env` would.
  The plan's own environment reaches the node in the agent's spec, as over SSH.
- `--chdir=/`: the step starts in /, not in the controller's working
  directory, which the node may not have (slurmstepd would say so on stderr).
- `--mpi=none`: no PMIx/PMI set-up for a step that is not MPI (a site may
  default to pmix). `--quiet`: none of srun's "queued and waiting" chatter.
- merge_stderr: `exec 2>&1` on the node, so that COMMAND's stderr joins its
  stdout there, while srun's own messages stay on the session's stderr.
- No `-l` (label): with it srun cuts every line longer than 1024 bytes into
  labelled pieces; without it a line arrives whole. Tags come from the agent.
- No `-u` (unbuffered): it gives the task a pseudo-terminal, which would
  mangle the agent's bytes.
- srun runs in a process session of its own: a Ctrl-C on the terminal reaches
  the controller only (one SIGINT makes srun print its status, two within a
  second abort the step).

FACTS (scripts/slurmcluster, 3 nodes, Slurm 22.05; see tests/test_srun_e2e.py):
- Step start: `srun --overlap ... /bin/true` takes 0.14-0.23 s; the login
  shell adds what the user's profile costs (root's here runs `pyenv init`:
  0.9-1.1 s in all, as ssh's login does).
- stdin and exit status: bytes through byte-exact, EOF reaches the task when
  stdin is closed; wait() returns the task's exit status (41 -> 41); a task
  killed by a signal gives 128+signal (SIGKILL 137, SIGTERM 143). srun's own
  failures (no such job, no such node in it) give 1, and say why on stderr.
- srun prints "srun: error: NODE: task 0: Exited with exit code N" (or
  "Killed", "Terminated") on stderr when the task fails, even with --quiet:
  stderr_text() leaves those lines out (the exit status says it).
- Lines: a line arrives whole, in order (300 KB in one line; a 1 MB line in
  ~32 KB reads). slurmstepd holds the last piece of a line until its newline
  (or EOF): `printf abc; sleep 2; echo def` arrives as one read, "abcdef\\n",
  after 2 s. The agent's frames all end in a newline, heartbeats included.
- --overlap: with it a step starts in 0.2 s on a node whose allocated CPUs
  another step holds (one started with --exclusive, too); without it srun
  waits, still pending at 3 s (tests/test_srun_e2e.py's two-sessions test
  times out without it).
- A step dies with its srun: once srun is SIGKILLed, every process of the step
  (setsid ones too, proctrack/cgroup; silent ones like `sleep`) is gone within
  0.1-0.5 s, and the step is gone from `squeue --steps` within 2.4-3.4 s. So
  nothing on a node outlives its session: a run that must outlive the
  controller's sessions runs in an sbatch job.
- A node that crashes (scripts/slurmcluster crash: slurmd, slurmstepd and the
  task SIGKILLed, its link down) never ends its srun: the step falls silent and
  stays RUNNING in `squeue --steps` (srun still waiting after 14 min; the step
  listed until the job ends, even after `scancel J.S`). slurmctld shows the
  node ALLOCATED+NOT_RESPONDING ~25 s after the crash, DOWN ~40 s after
  (SlurmdTimeout=30), and then ends the job unless it has --no-kill. A new step
  there waits while it is not responding, fails at once once it is DOWN:
  prove() bounds the wait; remote.py names a silent step's node lost once
  slurmctld says it does not respond.
- SIGTERM to srun makes Slurm SIGKILL the step at once ("STEP J.S CANCELLED",
  exit 137 after 1.1 s; the task's TERM trap never ran): this module never
  sends it. close() SIGKILLs the srun client; ending the job's processes
  gracefully is the node agent's work (kill mode), as over SSH.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import threading
import weakref

from ..errors import UnreachableError
from ..slurm import srun_argv
from .openssh import OpenSSHProcess

# How long a step on a node may take to start and run `true` (the user's login shell
# included) before the node counts as unreachable (SrunTransport.prove).
STEP_CHECK_TIMEOUT = 30.0

# What srun itself says about a task that failed; the exit status says it too.
_TASK_END = re.compile(r"^srun: error: \S+: tasks? [0-9,-]+: (Exited with exit code \d+|Killed|Terminated"
                       r"|Aborted|Segmentation fault|Hangup|Interrupt)$")


def render(argv: list[str]) -> str:
    """The srun line as one shell line (for a dry run: run it by hand)."""
    return shlex.join(argv)


class SrunProcess(OpenSSHProcess):
    """One srun client: a local process whose reads can time out, as an ssh
    session's (OpenSSHProcess); its exit status is the task's."""

    def wait(self, timeout: float | None = None) -> int | None:
        # Not OpenSSHProcess.wait: 255 is no link failure here, there is no link.
        try:
            return self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self) -> str:
        return "".join(line for line in super().stderr_text().splitlines(keepends=True)
                       if not _TASK_END.match(line.rstrip("\n")))


class SrunTransport:
    """One node of a Slurm job (`jobid`), each session a step run by srun.

    peer_addr is the node's NodeAddr from `scontrol show node` (the controller
    may not resolve node names): `addr` where the allocation already gave it, else
    looked up once, on first use.
    """

    def __init__(self, node: str, jobid: str, addr: str | None = None) -> None:
        self.name = node
        self.jobid = jobid
        self._peer: str | None = addr
        self._peer_lock = threading.Lock()
        self._closed = False
        self._sessions: weakref.WeakSet[SrunProcess] = weakref.WeakSet()

    def _tool(self, tool: str) -> str:
        path = shutil.which(tool)       # at call time: PATH may differ between calls
        if path is None:
            raise UnreachableError(f"{self.name}: transport srun needs the Slurm client `{tool}`, "
                                   "and it is not on PATH")
        return path

    def argv(self, command: str, merge_stderr: bool = False) -> list[str]:
        return srun_argv(self.name, self.jobid, command, merge_stderr=merge_stderr,
                         srun=self._tool("srun"))

    def exec(self, command: str, merge_stderr: bool = False) -> SrunProcess:
        if self._closed:
            raise UnreachableError(f"{self.name}: the srun transport was closed")
        proc = SrunProcess(self.argv(command, merge_stderr))
        self._sessions.add(proc)
        return proc

    @property
    def peer_addr(self) -> str:
        with self._peer_lock:
            if self._peer is None:
                self._peer = self._node_addr()
            return self._peer

    def _node_addr(self) -> str:
        argv = [self._tool("scontrol"), "show", "node", "--oneliner", self.name]
        try:
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=30)
        except subprocess.TimeoutExpired:
            raise UnreachableError(f"{self.name}: `{render(argv)}` did not answer within 30s") from None
        found = re.search(r"(?:^|\s)NodeAddr=(\S+)", out.stdout)
        if out.returncode != 0 or not found:
            why = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
            raise UnreachableError(f"{self.name}: no NodeAddr from `{render(argv)}`: {why}")
        return found.group(1)

    def prove(self, timeout: float = STEP_CHECK_TIMEOUT) -> None:
        """Raise UnreachableError unless a step starts on the node and ends well within
        `timeout`: a node Slurm holds for DOWN fails at once, one whose slurmd just died
        makes srun wait (measured: still waiting after 8 s), so the wait is bounded."""
        proc = self.exec("true")
        try:
            code = proc.wait(timeout)
            if code is None:
                from ..slurm import node_gone
                gone = node_gone(self.name)
                raise UnreachableError(f"{self.name}: no step of Slurm job {self.jobid} started on it within "
                                       f"{timeout:g}s" + (f" ({gone})" if gone else ""))
            if code != 0:
                why = (proc.stderr_text().strip().splitlines() or [f"exit code {code}"])[-1]
                raise UnreachableError(f"{self.name}: no step of Slurm job {self.jobid} could start on it ({why})")
        finally:
            proc.close()

    def alive(self) -> bool:
        # No link to lose: each session is a step of its own, and a step whose
        # node is lost ends with srun's own error.
        return not self._closed

    def close(self, linger: bool = False) -> None:
        """End every session still running: SIGKILL to its srun (never SIGTERM, which
        SIGKILLs the step at once); the step follows within ~3 s."""
        if self._closed:
            return
        self._closed = True
        for proc in list(self._sessions):
            proc.end()
