"""The `slurm` fixture: a real Slurm cluster on this machine for the test session.

scripts/slurmcluster builds it (slurmctld and one slurmd per node, munge, every
daemon in a network and UTS namespace of its own, on a bridge of its own) and
removes it at the end. It needs root; without root the Slurm tests are skipped
(or fail when CI=true), and likewise without Debian's slurmctld, slurmd,
slurm-client and munge (scripts/setup --test installs them).

While the cluster is up, SLURM_CONF is set in this process's environment (and
restored afterwards): every Slurm client needs it, since without it srun and
sinfo try a DNS SRV lookup for the controller, and the root namespace does not
resolve the nodes' names.

Environment:
  CLUSTERRUN_SLURMCLUSTER_PREFIX / _SUBNET / _STATE   see scripts/slurmcluster
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURMCLUSTER = REPO / "scripts" / "slurmcluster"
DEFAULT_STATE = Path("/tmp/clusterrun-slurmcluster")
SLURM_NODES = 3
SLURM_TOOLS = ("slurmctld", "slurmd", "srun", "salloc", "squeue", "scancel", "scontrol",
               "munged", "mungekey", "ip", "unshare")


@dataclasses.dataclass
class SlurmCluster:
    """A running scripts/slurmcluster: nodes [(name, addr)] and its slurm.conf."""

    state: Path
    nodes: list[tuple[str, str]]

    @property
    def conf(self) -> Path:
        return self.state / "etc" / "slurm.conf"

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.nodes]

    def addr_of(self, name: str) -> str:
        return dict(self.nodes)[name]

    def client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (squeue, scancel, ...) against the cluster."""
        return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "SLURM_CONF": str(self.conf)})

    def allocate(self, *args: str) -> str:
        """A job holding nodes, with no shell (`salloc --no-shell ARGS`): its id."""
        out = self.client("salloc", "--no-shell", "--job-name=clusterrun-test", *args)
        granted = re.search(r"Granted job allocation (\d+)", out.stderr)
        if granted:
            return granted.group(1)
        raise AssertionError(f"salloc --no-shell {' '.join(args)} gave no job: {out.stderr}")

    def jobs(self) -> list[str]:
        return self.client("squeue", "--noheader", "--format=%i").stdout.split()

    def steps(self, jobid: str) -> list[str]:
        return self.client("squeue", "--steps", "--noheader", f"--jobs={jobid}",
                           "--format=%i").stdout.split()

    def cancel(self, jobid: str, timeout: float = 20) -> None:
        """scancel the job and wait (bounded) until squeue no longer lists it."""
        self.client("scancel", jobid)
        deadline = time.monotonic() + timeout
        while jobid in self.jobs() and time.monotonic() < deadline:
            time.sleep(0.1)

    def crash(self, name: str) -> None:
        """The node dies as a machine that loses power (`scripts/slurmcluster crash`)."""
        out = _slurmcluster("crash", name, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr

    def revive(self, name: str, timeout: float = 60) -> None:
        """Bring a crashed node back and wait (bounded) until Slurm has it idle again."""
        out = _slurmcluster("revive", name, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node_state(name) == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"{name} is {self.node_state(name)!r}, not idle, {timeout:g}s after its revive")

    def node_state(self, name: str) -> str:
        """sinfo's state of the node (idle, allocated, down*, ...)."""
        return self.client("sinfo", "--noheader", "-N", f"--nodes={name}", "--format=%T").stdout.strip()

    def node_pids(self, name: str, comm: str) -> list[int]:
        """Processes named `comm` in the node's namespace (its tasks, for instance)."""
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                             timeout=10).stdout
        found = []
        for pid in out.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    found.append(int(pid))
            except OSError:
                pass
        return found


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so this is an error, not a skip", pytrace=False)
    pytest.skip(reason)


def _slurmcluster(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SLURMCLUSTER), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm():
    """Session-wide Slurm test cluster of 3 nodes; yields a SlurmCluster."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root to build the Slurm test cluster (scripts/slurmcluster)")
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if missing:
        _skip_or_fail(f"the Slurm test cluster needs slurmctld slurmd slurm-client munge "
                      f"(scripts/setup --test); missing: {' '.join(missing)}")
    state = Path(os.environ.get("CLUSTERRUN_SLURMCLUSTER_STATE") or DEFAULT_STATE)
    before = os.environ.get("SLURM_CONF")
    done = False
    try:
        up = _slurmcluster("up", str(SLURM_NODES), timeout=120)
        if up.returncode != 0:
            pytest.fail(f"scripts/slurmcluster up {SLURM_NODES} failed (exit {up.returncode}):\n"
                        f"{up.stdout}{up.stderr}", pytrace=False)
        nodes = [(name, addr) for name, addr in
                 (line.split() for line in (state / "nodes.txt").read_text().splitlines() if line.strip())]
        cluster = SlurmCluster(state, nodes)
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
        done = True
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        down = _slurmcluster("down", timeout=60)
        if down.returncode != 0:
            msg = f"scripts/slurmcluster down failed (exit {down.returncode}):\n{down.stdout}{down.stderr}"
            if done:
                pytest.fail(msg, pytrace=False)
            print(msg)
