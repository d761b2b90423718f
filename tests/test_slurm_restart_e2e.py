"""End-to-end: restarts (`up --max-restarts`) and spares on a real Slurm cluster (fixture
`slurm`, scripts/slurmcluster), within one allocation.

A node is crashed with `scripts/slurmcluster crash NODE`: every process of it (slurmd,
slurmstepd, the ranks) is SIGKILLed and its link goes down, as a machine that loses
power. Its srun step then never ends: it falls silent, and clusterrun names the node
lost once Slurm says it is not responding. The allocations are made with --no-kill,
without which Slurm ends the whole job when a node goes down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kit import write

pytestmark = pytest.mark.e2e

CLUSTERRUN = [sys.executable, "-m", "clusterrun"]

FLAKY = """\
    import os, sys
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, attempt = dist.get_rank(), int(os.environ["CLUSTERRUN_ATTEMPT"])
    print(f"rank {rank} attempt {attempt}", flush=True)
    if rank == 3 and attempt == 0:
        sys.exit(7)
    dist.barrier()
    print(f"rank {rank} done in attempt {attempt}", flush=True)
"""

# Attempt 0 waits until its node is crashed (the test says when every rank is up);
# a later attempt says where it runs and ends well.
CRASHY = """\
    import os, socket, time
    attempt = int(os.environ["CLUSTERRUN_ATTEMPT"])
    print(f"rank {os.environ['RANK']} attempt {attempt} node_rank {os.environ['GROUP_RANK']} "
          f"on {socket.gethostname()}", flush=True)
    if attempt == 0:
        time.sleep(600)
    print(f"rank {os.environ['RANK']} done in attempt {attempt}", flush=True)
"""


def _env(tmp_path: Path, job: str, nodelist: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]        # set by the `slurm` fixture
    env["CLUSTERRUN_HOME"] = str(tmp_path / "crhome")
    env.update(SLURM_JOB_ID=job, SLURM_JOBID=job, SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist)
    return env


def _python_on(slurm, names: list[str]) -> dict[str, list[int]]:
    return {n: slurm.node_pids(n, "python") + slurm.node_pids(n, "python3") for n in names}


def _steps(slurm, job: str) -> list[tuple[str, str]]:
    """The job's steps in `squeue --steps`: (step id, node list)."""
    out = slurm.client("squeue", "--steps", "--noheader", f"--jobs={job}", "--format=%i %N").stdout
    return [(step, nodes) for step, nodes in (line.split() for line in out.splitlines() if line.strip())]


def assert_clean(slurm, job: str, names: list[str], crashed: str | None = None) -> None:
    """No step of the job on these nodes in `squeue --steps`, no python on them (bounded
    wait). A step on the crashed node stays listed, RUNNING, until the job ends, whatever
    is done (measured, Slurm 22.05: its srun killed, `scancel J.S`, the node back)."""
    def left() -> tuple[list[tuple[str, str]], dict[str, list[int]]]:
        return [s for s in _steps(slurm, job) if s[1] != crashed], _python_on(slurm, names)

    deadline = time.monotonic() + 30
    while (left()[0] or any(left()[1].values())) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert left() == ([], {n: [] for n in names})


class Up:
    """`clusterrun up ...` in the allocation, its stdout read as it comes."""

    def __init__(self, slurm, tmp_path: Path, job: str, nodes: list[str], *args: str) -> None:
        self.p = subprocess.Popen([*CLUSTERRUN, "up", *args], env=_env(tmp_path, job, ",".join(nodes)),
                                  cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.err = ""
        self._out = threading.Thread(target=self._read, daemon=True)
        self._out.start()
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def _read_err(self) -> None:
        assert self.p.stderr is not None
        self.err = self.p.stderr.read()

    def wait_for(self, text: str, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in l for l in self.lines) < count:
            assert self.p.poll() is None, f"clusterrun ended first:\n" + "\n".join(self.lines) + self.err
            assert time.monotonic() < deadline, f"no {count} x {text!r} in {timeout:g}s:\n" + "\n".join(self.lines)
            time.sleep(0.2)

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, 9)
            raise
        self._out.join(10)
        self._err.join(10)
        return code


def test_a_failing_rank_is_restarted_on_the_same_allocation(slurm, tmp_path):
    nodes = slurm.names[:2]
    script = write(tmp_path / "flaky.py", FLAKY)
    job = slurm.allocate("-N2", "--exclusive", f"--nodelist={','.join(nodes)}")
    try:
        up = Up(slurm, tmp_path, job, nodes, "--nproc-per-node=2", "--max-restarts=2", "--restart-delay=1",
                "slurm", str(script))
        code = up.finish()
        assert code == 0, "\n".join(up.lines) + up.err
        n2 = nodes[1]
        assert (f"clusterrun: attempt 0 of 0-2 failed: rank 3 ({n2}, local rank 1) exited with code 7; "
                "restarting in 1s") in up.err.splitlines(), up.err
        assert f"[{n2} g3 l1] rank 3 done in attempt 1" in up.lines
        assert f"[{nodes[0]} g0 l0] rank 0 done in attempt 1" in up.lines
        run_id = next(l.split()[2].rstrip(":") for l in up.err.splitlines() if l.startswith("clusterrun: run "))
        st = subprocess.run([*CLUSTERRUN, "status", "--json", run_id], env=_env(tmp_path, job, ",".join(nodes)),
                            capture_output=True, text=True, timeout=60)
        data = json.loads(st.stdout)
        assert (data["state"], data["attempt"], data["max_restarts"]) == ("succeeded", 1, 2)
        assert [n["node"] for n in data["nodes"]] == nodes
        assert_clean(slurm, job, nodes)
        assert job in slurm.jobs()      # the allocation is the user's: it stays
    finally:
        slurm.cancel(job)


def test_a_spare_takes_the_place_of_a_node_whose_slurmd_died(slurm, tmp_path):
    n1, n2, n3 = slurm.names[:3]
    script = write(tmp_path / "crashy.py", CRASHY)
    hosts = write(tmp_path / "hosts.yaml", """\
        slurm:
          nodes: 2
        nproc_per_node: 1
        max_restarts: 1
        restart_delay: 1
    """)
    job = slurm.allocate("-N3", "--exclusive", "--no-kill", f"--nodelist={n1},{n2},{n3}")
    try:
        up = Up(slurm, tmp_path, job, [n1, n2, n3], str(hosts), str(script))
        up.wait_for(" attempt 0 ", 2)
        slurm.crash(n2)
        code = up.finish()
        err = up.err.splitlines()
        assert code == 0, "\n".join(up.lines) + up.err
        failed = next(l for l in err if l.startswith("clusterrun: attempt 0 of 0-1 failed: "))
        assert failed.startswith(f"clusterrun: attempt 0 of 0-1 failed: node {n2} (node_rank 1) was lost: "
                                 "its srun step fell silent (nothing for "), up.err
        assert "and Slurm says the node is " in failed and "NOT_RESPONDING" in failed, failed
        assert f"clusterrun: {n2} was lost; {n3} takes node_rank 1" in err, up.err
        # node_rank is the place in the new roster: the spare is node 1, rank 1
        assert f"[{n3} g1 l0] rank 1 attempt 1 node_rank 1 on {n3}" in up.lines, up.lines
        assert f"[{n1} g0 l0] rank 0 attempt 1 node_rank 0 on {n1}" in up.lines, up.lines
        assert f"[{n3} g1 l0] rank 1 done in attempt 1" in up.lines
        assert_clean(slurm, job, [n1, n3], crashed=n2)
    finally:
        slurm.cancel(job)
        slurm.revive(n2)


def test_with_no_spare_the_lost_node_is_named_and_nothing_is_left(slurm, tmp_path):
    n1, n2 = slurm.names[:2]
    script = write(tmp_path / "crashy.py", CRASHY)
    job = slurm.allocate("-N2", "--exclusive", "--no-kill", f"--nodelist={n1},{n2}")
    try:
        up = Up(slurm, tmp_path, job, [n1, n2], "--nproc-per-node=1", "--max-restarts=1", "--restart-delay=1",
                "slurm", str(script))
        up.wait_for(" attempt 0 ", 2)
        slurm.crash(n2)
        code = up.finish()
        err = up.err.splitlines()
        assert code == 1, "\n".join(up.lines) + up.err
        assert any(l.startswith(f"clusterrun: attempt 0 of 0-1 failed: node {n2} (node_rank 1) was lost: its srun "
                                "step fell silent") for l in err), up.err
        assert any(l.startswith(f"clusterrun: no further attempt: {n2} (node_rank 1) is missing and no spare "
                                f"is left: {n2}: no step of Slurm job {job} ") for l in err), up.err
        assert f"clusterrun: node {n1} (rank 0) was stopped after node {n2} failed" in err, up.err
        assert any(l.startswith(f"clusterrun: node {n2} (node_rank 1) was lost: its srun step fell silent")
                   for l in err), up.err
        assert not any(" attempt 1 " in l for l in up.lines)
        assert_clean(slurm, job, [n1], crashed=n2)
    finally:
        slurm.cancel(job)
        slurm.revive(n2)


def test_without_no_kill_slurm_ends_the_allocation_and_the_run_says_why(slurm, tmp_path):
    """Slurm ends a job made without --no-kill when one of its nodes goes DOWN: no spare can
    stand in, and the run says so. (The restart delay outlasts SlurmdTimeout, so that the
    next attempt is tried once Slurm has ended the job.)"""
    n1, n2, n3 = slurm.names[:3]
    script = write(tmp_path / "crashy.py", CRASHY)
    hosts = write(tmp_path / "hosts.yaml", """\
        slurm:
          nodes: 2
        nproc_per_node: 1
        max_restarts: 1
        restart_delay: 20
    """)
    job = slurm.allocate("-N3", "--exclusive", f"--nodelist={n1},{n2},{n3}")
    try:
        up = Up(slurm, tmp_path, job, [n1, n2, n3], str(hosts), str(script))
        up.wait_for(" attempt 0 ", 2)
        slurm.crash(n2)
        code = up.finish()
        err = up.err.splitlines()
        assert code == 1, "\n".join(up.lines) + up.err
        assert any(l.startswith(f"clusterrun: attempt 0 of 0-1 failed: node {n2} (node_rank 1) was lost: its srun "
                                "step fell silent") for l in err), up.err
        assert any(l.startswith("clusterrun: no further attempt: ") for l in err), up.err
        ended = [l for l in err if l.startswith(f"clusterrun: slurm job {job}: ")]
        assert len(ended) == 1 and "(NodeDown): Slurm ends an allocation when one of its nodes goes down, " \
            "unless it was made with --no-kill" in ended[0], up.err
        assert not any(" attempt 1 " in l for l in up.lines)
        assert _python_on(slurm, [n1, n3]) == {n1: [], n3: []}
    finally:
        slurm.cancel(job)
        slurm.revive(n2)
