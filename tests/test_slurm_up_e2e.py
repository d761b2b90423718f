"""End-to-end: `clusterrun up|exec|check slurm` inside an allocation of a real Slurm
cluster (fixture `slurm`, scripts/slurmcluster), every node reached by srun.

A test allocates with `salloc --no-shell` and runs clusterrun with SLURM_JOB_ID and
SLURM_JOB_NODELIST as salloc sets them (so that it can interrupt clusterrun itself),
or runs `salloc ... -- clusterrun ...` as a user types it. Whatever it allocates is
cancelled, and afterwards nothing of it is left: no job in squeue, no process on a node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit import REPORT, check_tags, reports, write

pytestmark = pytest.mark.e2e

CLUSTERRUN = [sys.executable, "-m", "clusterrun"]


def _env(tmp_path: Path, job: str | None = None, nodelist: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]        # set by the `slurm` fixture
    env["CLUSTERRUN_HOME"] = str(tmp_path / "crhome")
    if job is not None and nodelist is not None:
        env.update(SLURM_JOB_ID=job, SLURM_JOBID=job, SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist)
    return env


def in_allocation(slurm, tmp_path: Path, salloc_args: list[str], *args: str,
                  timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`salloc SALLOC_ARGS -- clusterrun ARGS` in tmp_path, as a user types it."""
    return subprocess.run(["salloc", "--job-name=clusterrun-test", *salloc_args, "--", *CLUSTERRUN, *args],
                          env=_env(tmp_path), cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def run_id_of(stderr: str) -> str:
    return next(l.split()[2].rstrip(":") for l in stderr.splitlines() if l.startswith("clusterrun: run "))


def assert_nothing_left(slurm) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = {n: slurm.node_pids(n, "python") + slurm.node_pids(n, "python3") for n in slurm.names}
        if not slurm.jobs() and not any(left.values()):
            return
        time.sleep(0.2)
    assert slurm.jobs() == []
    assert left == {n: [] for n in slurm.names}


@pytest.fixture
def two(slurm):
    """The first two nodes, in the order `scontrol show hostnames` gives them."""
    names = slurm.names[:2]
    yield names
    assert_nothing_left(slurm)


def test_two_nodes_two_ranks_each_tags_match_the_ranks(slurm, two, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    r = in_allocation(slurm, tmp_path, ["-N2", "--exclusive", f"--nodelist={','.join(two)}"],
                      "up", "--nproc-per-node=2", "slurm", str(script), "--lr", "0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    check_tags(r.stdout, two, [2, 2])
    assert {tuple(rep["args"]) for _, rep in reports(r.stdout)} == {("--lr", "0.1")}
    run_id = run_id_of(r.stderr)
    # A finished Slurm run reads back from outside the allocation, as over SSH.
    st = subprocess.run([*CLUSTERRUN, "status", "--json", run_id], env=_env(tmp_path),
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    assert [n["node"] for n in data["nodes"]] == two
    logs = subprocess.run([*CLUSTERRUN, "logs", run_id, "--rank=3"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0, logs.stderr
    assert '"rank": 3' in logs.stdout and '"rank": 0' not in logs.stdout
    for verb in (["kill", run_id], ["stacks", run_id]):
        other = subprocess.run([*CLUSTERRUN, *verb], env=_env(tmp_path), capture_output=True, text=True,
                               timeout=60)
        assert "Traceback" not in other.stderr and other.returncode in (0, 2), other.stderr
        assert "has already ended" in other.stderr or "has ended" in other.stderr, other.stderr


def test_a_failing_rank_is_named_with_its_code(slurm, two, tmp_path):
    script = write(tmp_path / "fail.py", """\
        import sys, time
        import torch.distributed as dist
        dist.init_process_group("gloo")
        if dist.get_rank() == 3:
            print("rank 3 gives up", flush=True)
            sys.exit(7)
        dist.barrier()      # the others wait for rank 3, and are stopped (fail fast)
        time.sleep(600)
    """)
    r = in_allocation(slurm, tmp_path, ["-N2", "--exclusive", f"--nodelist={','.join(two)}"],
                      "up", "--nproc-per-node=2", "slurm", str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.splitlines()
    assert f"clusterrun: node {two[1]} failed: stopping the other nodes" in err, r.stderr
    # The summary: the first failure first, with its last lines; then every other rank, each
    # either stopped by clusterrun or failed by itself when rank 3's connections closed (gloo).
    summary = [l for l in err if l.startswith("clusterrun: rank ")]
    assert summary[0] == f"clusterrun: rank 3 ({two[1]}, local rank 1) exited with code 7", r.stderr
    assert "  | rank 3 gives up" in err[err.index(summary[0]) + 1:err.index(summary[1])], r.stderr
    others = {int(l.split()[2]): l for l in summary[1:]}
    assert sorted(others) == [0, 1, 2], r.stderr
    for rank, line in others.items():
        node, local = two[rank // 2], rank % 2
        assert line.startswith(f"clusterrun: rank {rank} ({node}, local rank {local}) "), line
        assert (line.endswith("was stopped (SIGTERM) after rank 3 failed") or " exited with code " in line
                or ") raised RuntimeError, then was killed by " in line), line
    assert "[" + two[1] + " g3 l1] rank 3 gives up" in r.stdout.splitlines()
    st = subprocess.run([*CLUSTERRUN, "status", "--json", run_id_of(r.stderr)], env=_env(tmp_path),
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "failed", st.stdout + st.stderr


def test_exec_and_check_slurm(slurm, two, tmp_path):
    r = in_allocation(slurm, tmp_path, ["-N2", f"--nodelist={','.join(two)}"],
                      "exec", "slurm", "--", "sh", "-c", 'echo "$(hostname) ${SLURM_JOB_ID:+has-job}"')
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"[{n}] {n} has-job" for n in two)
    r = in_allocation(slurm, tmp_path, ["-N2", f"--nodelist={','.join(two)}"], "check", "slurm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [l.split()[0] for l in r.stdout.splitlines()[2:]] == two, r.stdout


def test_one_cpu_per_node_is_refused_with_the_fix(slurm, two, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    r = in_allocation(slurm, tmp_path, ["-N2", f"--nodelist={','.join(two)}"],
                      "up", "--nproc-per-node=2", "slurm", str(script))
    assert r.returncode == 2, r.stdout + r.stderr
    for n in two:
        assert (f"{n}: the Slurm step gets 1 CPU" in r.stderr and "fewer than nproc_per_node 2" in r.stderr
                and "--exclusive" in r.stderr), r.stderr
    assert "REPORT" not in r.stdout


def test_a_300kb_line_arrives_whole(slurm, two, tmp_path):
    script = write(tmp_path / "long.py", """\
        import os
        if os.environ["RANK"] == "1":
            print("L" * 300_000, flush=True)
        print("done", flush=True)
    """)
    r = in_allocation(slurm, tmp_path, ["-N2", f"--nodelist={','.join(two)}"],
                      "up", "--nproc-per-node=1", "slurm", str(script))
    assert r.returncode == 0, r.stderr
    assert f"[{two[1]} g1 l0] " + "L" * 300_000 in r.stdout.splitlines()


def test_ctrl_c_stops_every_rank_and_leaves_nothing(slurm, two, tmp_path):
    script = write(tmp_path / "sleeper.py", """\
        import os, time
        print("up", os.environ["RANK"], flush=True)
        time.sleep(600)
    """)
    job = slurm.allocate("-N2", f"--nodelist={','.join(two)}")
    try:
        p = subprocess.Popen([*CLUSTERRUN, "up", "--nproc-per-node=1", "slurm", str(script)],
                             env=_env(tmp_path, job, ",".join(two)), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        seen = []
        assert p.stdout is not None
        while len(seen) < 2:
            line = p.stdout.readline()
            assert line, "clusterrun ended before every rank was up"
            if " up " in line:
                seen.append(line)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        deadline = time.monotonic() + 20
        while (slurm.steps(job) or any(slurm.node_pids(n, "python3") + slurm.node_pids(n, "python")
                                       for n in two)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slurm.steps(job) == []
        assert [slurm.node_pids(n, "python3") + slurm.node_pids(n, "python") for n in two] == [[], []]
    finally:
        slurm.cancel(job)


def test_outside_an_allocation_slurm_is_refused(slurm, tmp_path):
    r = subprocess.run([*CLUSTERRUN, "exec", "slurm", "--", "true"], env=_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "not inside a Slurm allocation" in r.stderr and "salloc" in r.stderr, r.stderr


def test_detached_is_refused_on_slurm(slurm, two, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    r = in_allocation(slurm, tmp_path, ["-N2", f"--nodelist={','.join(two)}"],
                      "up", "-d", "slurm", str(script))
    assert r.returncode == 2
    assert "up --detach inside a Slurm allocation" in r.stderr and "up -d slurm" in r.stderr, r.stderr


def test_a_killed_srun_session_is_a_lost_node_and_its_job_ends_with_it(slurm, two, tmp_path):
    """On Slurm the node's job lives in the step of its start session: SIGKILL to that
    session's srun ends the job there (proctrack/cgroup), and the node is named lost."""
    script = write(tmp_path / "sleeper.py", """\
        import os, time
        print("up", os.environ["RANK"], flush=True)
        time.sleep(600)
    """)
    job = slurm.allocate("-N2", f"--nodelist={','.join(two)}")
    try:
        p = subprocess.Popen([*CLUSTERRUN, "up", "--nproc-per-node=1", "slurm", str(script)],
                             env=_env(tmp_path, job, ",".join(two)), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert p.stdout is not None
        seen = 0
        while seen < 2:
            line = p.stdout.readline()
            assert line, "clusterrun ended before every rank was up"
            seen += " up " in line
        sruns = subprocess.run(["pgrep", "-f", f"srun --jobid={job} .*--nodelist={two[1]} "],
                               capture_output=True, text=True).stdout.split()
        assert sruns
        os.kill(int(sruns[0]), signal.SIGKILL)     # the first is the client; its helper child follows
        _, err = p.communicate(timeout=90)
        assert p.returncode == 1, err
        assert f"clusterrun: node {two[1]} (node_rank 1) was lost: its srun step ended" in err, err
        deadline = time.monotonic() + 20
        while slurm.steps(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slurm.steps(job) == []
    finally:
        slurm.cancel(job)
