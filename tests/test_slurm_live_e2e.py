"""End-to-end: the commands on a live Slurm run (fixture `slurm`, scripts/slurmcluster).

An attached `clusterrun up slurm SCRIPT` runs in the background inside an allocation
(`salloc --no-shell`, its SLURM_JOB_ID and SLURM_JOB_NODELIST in up's environment),
and `status`, `ps`, `stacks`, `logs -f` and `kill` reach it from another process:
from inside the allocation (the same SLURM_* variables) and from outside it, as on
a login node (no SLURM_JOB_ID; only SLURM_CONF). The allocation is the test's: kill
must leave it, and the test cancels it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kit import write
from test_slurm_up_e2e import CLUSTERRUN, _env, assert_nothing_left, run_id_of
from test_stacks_e2e import HANG, groups

pytestmark = pytest.mark.e2e

# Every rank says when it is up and when SIGTERM reaches it (the clusterrun way: TERM,
# grace, KILL; SIGTERM to srun would SIGKILL the step, and no handler would run).
SLEEPER = """\
    import os, signal, sys, time
    rank = os.environ["RANK"]
    def term(*_):
        print(f"rank {rank} got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    print(f"up {rank}", flush=True)
    time.sleep(600)
"""


class Attached:
    """`clusterrun up` in the background, its stdout and stderr collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.p = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                        for s, lines in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, what, description: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.p.poll() is not None and not any(t.is_alive() for t in self.readers):
                raise AssertionError(f"up ended ({self.p.returncode}) before {description}:\n"
                                     + "\n".join(self.out + self.err))
            assert time.monotonic() < deadline, f"no {description} in {timeout}s:\n" + "\n".join(self.out + self.err)
            time.sleep(0.1)

    def end(self, timeout: float = 90) -> int:
        code = self.p.wait(timeout)
        for t in self.readers:
            t.join(10)
        return code

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(30)


def cr(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLUSTERRUN, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.fixture
def two(slurm):
    names = slurm.names[:2]
    yield names
    assert_nothing_left(slurm)


def start(slurm, two: list[str], tmp_path: Path, script: Path, *args: str,
          salloc: tuple[str, ...] = ("--exclusive",), nproc: int = 2) -> tuple[str, Attached, dict[str, str], str]:
    """An allocation of `two`, and `up slurm SCRIPT ARGS` attached in it: (job, up, up's env, run id)."""
    job = slurm.allocate("-N2", *salloc, f"--nodelist={','.join(two)}")
    env = _env(tmp_path, job, ",".join(two))
    up = Attached([*CLUSTERRUN, "up", f"--nproc-per-node={nproc}", "slurm", str(script), *args], env, tmp_path)
    up.wait_for(lambda: sum(l.split()[-2:-1] == ["up"] for l in up.out) == 2 * nproc, "every rank up")
    return job, up, env, run_id_of("\n".join(up.err))


def test_status_ps_stacks_and_logs_follow_of_a_live_slurm_run(slurm, two, tmp_path):
    script = write(tmp_path / "hang.py", HANG)
    release = tmp_path / "release"
    job, up, inside, run_id = None, None, None, None
    try:
        job, up, inside, run_id = start(slurm, two, tmp_path, script, str(release))
        outside = _env(tmp_path)        # a login node's shell: no SLURM_JOB_ID

        # status and ps: the Slurm job and its state next to the run's own, in and out of the allocation.
        for env in (inside, outside):
            st = cr(env, "status", run_id)
            assert st.returncode == 0, st.stderr
            assert st.stdout.splitlines()[0].startswith(f"run {run_id}: running ("), st.stdout
            assert st.stdout.splitlines()[1] == f"slurm job {job}: RUNNING", st.stdout
            data = json.loads(cr(env, "status", "--json", run_id).stdout)
            assert data["state"] == "running"
            assert data["slurm"] == {"job": job, "state": "RUNNING", "reason": "", "why": ""}, data
            ps = cr(env, "ps")
            assert ps.returncode == 0, ps.stderr
            assert ps.stdout.splitlines()[0].split() == ["run", "state", "nodes", "ranks", "slurm", "job", "script"]
            row = next(l for l in ps.stdout.splitlines() if l.startswith(run_id))
            assert re.match(rf"{run_id}\s+running\s+2\s+4\s+{job} RUNNING\s+\S*hang\.py ", row), ps.stdout

        # stacks from outside the allocation: every rank, grouped, as over SSH.
        r = cr(outside, "stacks", run_id)
        assert r.returncode == 0, r.stdout + r.stderr
        (odd, odd_frames), (rest, rest_frames) = groups(r.stdout)
        assert odd == f"rank 3 ({two[1]}): read by faulthandler", r.stdout
        assert re.fullmatch(r".*/hang\.py:6 in wait_for_shard", odd_frames[-1]), odd_frames
        assert rest == f"ranks 0-2 ({two[0]}, {two[1]}): read by faulthandler", r.stdout
        assert rest_frames[-1].endswith(" in barrier"), rest_frames
        # and from inside it, one rank
        only = cr(inside, "stacks", "--rank", "3", run_id)
        assert only.returncode == 0, only.stderr
        assert [h for h, _ in groups(only.stdout)] == [f"rank 3 ({two[1]}): read by faulthandler"]

        # logs -f from outside: what the run printed so far, then a line printed after it started.
        follow = Attached([*CLUSTERRUN, "logs", "-f", run_id], outside, tmp_path)
        try:
            follow.wait_for(lambda: any(l == f"[{two[1]} g3 l1] up 3" for l in follow.out), "rank 3's first line")
            assert not any("done" in l for l in follow.out)
            release.touch()         # rank 3 leaves wait_for_shard, every rank passes the barrier
            follow.wait_for(lambda: f"[{two[1]} g3 l1] done 3" in follow.out, "a line printed after logs -f began")
            assert follow.end(60) == 0, follow.err      # the run ended: logs -f ends with it
        finally:
            follow.stop()
        assert up.end() == 0, "\n".join(up.out + up.err)
        # The run has ended; the allocation is still the user's.
        st = json.loads(cr(outside, "status", "--json", run_id).stdout)
        assert st["state"] == "succeeded" and st["slurm"]["state"] == "RUNNING", st
    finally:
        if up is not None:
            up.stop()
        if job is not None:
            slurm.cancel(job)


def test_kill_of_a_live_slurm_run_stops_every_rank_and_leaves_the_allocation(slurm, two, tmp_path):
    script = write(tmp_path / "sleeper.py", SLEEPER)
    job, up = None, None
    try:
        job, up, inside, run_id = start(slurm, two, tmp_path, script, salloc=(), nproc=1)
        assert slurm.steps(job)             # the run's steps, one per node
        k = cr(_env(tmp_path), "kill", "--grace", "5", run_id)     # from outside the allocation
        assert k.returncode == 0, k.stderr
        assert f"clusterrun: killed run {run_id}: nothing of it is left on its nodes" in k.stderr, k.stderr
        code = up.end()
        err = "\n".join(up.err)
        assert code == 1, err
        for n, g in zip(two, (0, 1)):
            assert f"clusterrun: node {n} (rank {g}) was killed (clusterrun kill)" in up.err, err
        # TERM reached every rank (its handler ran): not srun's SIGKILL of the step.
        logs = cr(_env(tmp_path), "logs", run_id).stdout
        for n, g in zip(two, (0, 1)):
            assert f"[{n} g{g} l0] rank {g} got SIGTERM" in logs.splitlines(), logs
        # No step of the run, no process on a node; the allocation is still there.
        deadline = time.monotonic() + 20
        while slurm.steps(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slurm.steps(job) == []
        assert [slurm.node_pids(n, "python3") + slurm.node_pids(n, "python") for n in two] == [[], []]
        assert job in slurm.jobs()
        st = json.loads(cr(_env(tmp_path), "status", "--json", run_id).stdout)
        assert st["state"] == "killed" and st["slurm"]["state"] == "RUNNING", st
        again = cr(_env(tmp_path), "kill", run_id)
        assert again.returncode == 0 and "already ended" in again.stderr, again.stderr
        assert job in slurm.jobs()
    finally:
        if up is not None:
            up.stop()
        if job is not None:
            slurm.cancel(job)


def test_with_its_up_gone_kill_uses_steps_of_its_own_and_a_cancelled_job_is_said(slurm, two, tmp_path):
    """`up` SIGKILLed: its srun clients live on (a session of their own), and so do the
    steps and the ranks. kill then starts --overlap steps of its own: TERM, grace, KILL.
    A second run whose allocation is then cancelled: status names the nodes lost and the
    job CANCELLED; kill says the job has ended, so nothing can be left."""
    script = write(tmp_path / "sleeper.py", SLEEPER)
    job, up = None, None
    outside = _env(tmp_path)
    try:
        job, up, inside, run_id = start(slurm, two, tmp_path, script, salloc=(), nproc=1)
        os.kill(up.p.pid, signal.SIGKILL)
        up.end()
        assert len(slurm.steps(job)) == 2       # the run's steps outlive its up
        ps = cr(outside, "ps").stdout
        assert re.search(rf"^{run_id}\s+running\?\s+2\s+2\s+{job} RUNNING ", ps, re.M), ps
        k = cr(outside, "kill", "--grace", "5", run_id)
        assert k.returncode == 0, k.stderr
        assert f"clusterrun: killed run {run_id}: nothing of it is left on its nodes" in k.stderr, k.stderr
        logs = cr(outside, "logs", run_id).stdout.splitlines()
        assert all(f"[{n} g{g} l0] rank {g} got SIGTERM" in logs for n, g in zip(two, (0, 1))), logs
        deadline = time.monotonic() + 20
        while slurm.steps(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slurm.steps(job) == []
        assert [slurm.node_pids(n, "python3") + slurm.node_pids(n, "python") for n in two] == [[], []]
        st = json.loads(cr(outside, "status", "--json", run_id).stdout)
        assert st["state"] == "killed" and st["slurm"]["state"] == "RUNNING", st

        up = Attached([*CLUSTERRUN, "up", "--nproc-per-node=1", "slurm", str(script)], inside, tmp_path)
        up.wait_for(lambda: sum(l.split()[-2:-1] == ["up"] for l in up.out) == 2, "every rank up")
        second = run_id_of("\n".join(up.err))
        os.kill(up.p.pid, signal.SIGKILL)
        up.end()
        slurm.cancel(job)
        st = json.loads(cr(outside, "status", "--json", second).stdout)
        assert st["slurm"]["state"] == "CANCELLED", st
        assert [n["state"] for n in st["nodes"]] == ["lost", "lost"], st
        assert all(n["message"].startswith(f"no step of its Slurm job {job} could be started to reach it")
                   for n in st["nodes"]), st
        k = cr(outside, "kill", second)
        assert k.returncode == 0, k.stderr
        assert (f"clusterrun: run {second} has already ended, and its Slurm job {job} has ended (CANCELLED): "
                "nothing of it can be left on its nodes") in k.stderr, k.stderr
    finally:
        if up is not None:
            up.stop()
        if job is not None:
            slurm.cancel(job)
