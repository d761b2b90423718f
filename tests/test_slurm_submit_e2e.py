"""End-to-end: `clusterrun up` on Slurm outside an allocation submits one with sbatch
(fixture `slurm`, scripts/slurmcluster), and follows it from here; the job's batch step
runs the run's controller, which reaches every node by srun.

clusterrun runs here with no SLURM_JOB_ID (as on a login node), CLUSTERRUN_HOME in the
test's directory (this one machine's filesystem is shared by the lab's nodes). After each
test nothing of it is left: no job in squeue, no process on a node.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kit import REPORT, check_tags, reports, write
from test_slurm_up_e2e import CLUSTERRUN, _env, assert_nothing_left

pytestmark = pytest.mark.e2e

SLEEPER = """\
    import os, signal, sys, time
    def term(*_):
        print("rank", os.environ["RANK"], "got SIGTERM", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, term)
    print("rank", os.environ["RANK"], "up", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def lab(slurm):
    yield slurm
    assert_nothing_left(slurm)


def job_file(tmp_path: Path, **slurm_keys) -> Path:
    keys = {"nodes": 2, **slurm_keys}
    return write(tmp_path / "job.yaml", "slurm: " + json.dumps(keys) + "\nnproc_per_node: 2\n")


def clusterrun(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLUSTERRUN, *args], env=_env(tmp_path), cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def job_of(stderr: str) -> str:
    line = next(l for l in stderr.splitlines() if " submitted as Slurm job " in l)
    return line.split(" submitted as Slurm job ")[1].split()[0]


def status(tmp_path: Path, run_id: str) -> dict:
    st = clusterrun(tmp_path, "status", "--json", run_id, timeout=60)
    assert st.returncode == 0, st.stderr
    return json.loads(st.stdout)


def test_submitted_attached_streams_tagged_lines_and_exits_with_the_runs_code(lab, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    args = ["--msg", "two words", 'a "quoted" \'one\'', "$HOME", "`id`", "#not-a-comment"]
    r = clusterrun(tmp_path, "up", job_file(tmp_path).name, script.name, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    job = job_of(r.stderr)
    run_id = next(l.split()[2] for l in r.stderr.splitlines() if " submitted as Slurm job " in l)
    data = status(tmp_path, run_id)
    nodes = [n["node"] for n in data["nodes"]]
    assert len(nodes) == 2 and set(nodes) <= set(lab.names)
    check_tags(r.stdout, nodes, [2, 2])
    # Every word reaches the script as typed: quoted once in the sbatch script, never re-read.
    assert {tuple(rep["args"]) for _, rep in reports(r.stdout)} == {tuple(args)}
    assert data["state"] == "succeeded" and data["slurm"]["job"] == job
    # The controller's own words come through too, as from an attached up.
    assert any(l.startswith(f"clusterrun: run {run_id}: 2 nodes, 4 ranks") for l in r.stderr.splitlines())


def test_detached_prints_the_run_id_then_logs_and_status_follow_it(lab, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    r = clusterrun(tmp_path, "up", "-d", job_file(tmp_path).name, script.name, timeout=60)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.splitlines()[-1]
    job = job_of(r.stderr)
    assert run_id in r.stderr
    # Right after -d the job may still be pending or starting: logs -f waits, then follows to the end.
    logs = clusterrun(tmp_path, "logs", "-f", run_id)
    assert logs.returncode == 0, logs.stderr
    assert sorted(rep["rank"] for _, rep in reports(logs.stdout)) == [0, 1, 2, 3], logs.stdout
    deadline = time.monotonic() + 60
    while (data := status(tmp_path, run_id))["state"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert data["state"] == "succeeded", data
    assert data["slurm"]["job"] == job
    ps = clusterrun(tmp_path, "ps", timeout=60)
    assert any(l.startswith(run_id) and " succeeded " in l and f" {job} " in l for l in ps.stdout.splitlines())


def test_a_failing_rank_is_named_and_its_code_is_the_exit(lab, tmp_path):
    script = write(tmp_path / "fail.py", """\
        import sys, time
        import torch.distributed as dist
        dist.init_process_group("gloo")
        if dist.get_rank() == 3:
            sys.exit(7)
        dist.barrier()
        time.sleep(600)
    """)
    r = clusterrun(tmp_path, "up", job_file(tmp_path).name, script.name)
    assert r.returncode == 1, r.stdout + r.stderr
    assert any(l.startswith("clusterrun: rank 3 (") and l.endswith(", local rank 1) exited with code 7")
               for l in r.stderr.splitlines()), r.stderr


def test_sbatch_refusing_the_job_is_exit_2_with_its_words(lab, tmp_path):
    r = clusterrun(tmp_path, "up", "--sbatch-arg=--partition=nosuchpart", job_file(tmp_path).name, "x.py",
                   timeout=60)
    assert r.returncode == 2, r.stderr
    assert "clusterrun: sbatch refused the job:" in r.stderr
    assert "sbatch: error: invalid partition specified: nosuchpart" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    ps = clusterrun(tmp_path, "ps", timeout=60)
    assert ps.stdout.startswith("no runs yet"), ps.stdout       # nothing was submitted: nothing recorded


def test_ctrl_c_while_pending_cancels_the_job(lab, tmp_path):
    hold = lab.allocate(f"-N{len(lab.names)}")         # every node taken: the run's job must wait
    try:
        p = subprocess.Popen([*CLUSTERRUN, "up", job_file(tmp_path).name, "x.py"], env=_env(tmp_path),
                             cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stderr is not None
        first = p.stderr.readline()
        job = job_of(first)
        deadline = time.monotonic() + 30
        while lab.client("squeue", "--noheader", "--format=%T", f"--jobs={job}").stdout.strip() != "PENDING":
            assert time.monotonic() < deadline, "the job never showed as pending"
            time.sleep(0.2)
        run_id = first.split()[2]
        st = status(tmp_path, run_id)
        # (Slurm gives the reason, e.g. Resources, once its scheduler has looked at the job.)
        assert st["state"] == "pending" and st["slurm"]["state"] == "PENDING", st
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert f"Slurm job {job} was cancelled before it started" in err
        assert job not in lab.jobs()
        assert status(tmp_path, run_id)["state"] == "killed"
    finally:
        lab.cancel(hold)


def test_kill_of_a_submitted_run_stops_every_rank_then_its_job(lab, tmp_path):
    script = write(tmp_path / "sleeper.py", SLEEPER)
    r = clusterrun(tmp_path, "up", "-d", job_file(tmp_path).name, script.name, timeout=60)
    assert r.returncode == 0, r.stderr
    run_id, job = r.stdout.splitlines()[-1], job_of(r.stderr)
    logs_dir = tmp_path / "crhome" / "runs" / run_id / "logs"
    deadline = time.monotonic() + 180
    while sum(1 for g in range(4) if b" up" in _read(logs_dir / f"rank{g}.log")) < 4:
        assert time.monotonic() < deadline, clusterrun(tmp_path, "status", run_id).stdout
        time.sleep(0.5)
    k = clusterrun(tmp_path, "kill", run_id, timeout=120)
    assert k.returncode == 0, k.stderr
    assert f"its Slurm job {job} is over" in k.stderr, k.stderr
    for g in range(4):      # the clusterrun way: every rank's SIGTERM handler ran
        assert f"rank {g} got SIGTERM".encode() in _read(logs_dir / f"rank{g}.log")
    assert job not in lab.jobs()
    assert status(tmp_path, run_id)["state"] == "killed"


def test_kill_of_a_pending_run_cancels_its_job(lab, tmp_path):
    hold = lab.allocate(f"-N{len(lab.names)}")
    try:
        r = clusterrun(tmp_path, "up", "-d", job_file(tmp_path).name, "x.py", timeout=60)
        assert r.returncode == 0, r.stderr
        run_id, job = r.stdout.splitlines()[-1], job_of(r.stderr)
        logs = clusterrun(tmp_path, "logs", run_id, timeout=60)
        assert logs.returncode == 0 and f"Slurm job {job} is pending" in logs.stderr, logs.stderr
        k = clusterrun(tmp_path, "kill", run_id, timeout=60)
        assert k.returncode == 0, k.stderr
        assert f"its Slurm job {job} was pending, and is cancelled" in k.stderr
        assert job not in lab.jobs()
    finally:
        lab.cancel(hold)


def test_too_few_cpus_asked_is_the_preflights_refusal_with_the_fix(lab, tmp_path):
    """clusterrun asks --cpus-per-task=nproc_per_node; a user's -c1 replaces it, and the
    controller's preflight in the batch step then refuses (its words, its exit code)."""
    r = clusterrun(tmp_path, "up", "--sbatch-arg=-c1", job_file(tmp_path).name, "x.py")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "clusterrun: preflight failed, nothing was started:" in r.stderr, r.stderr
    assert "fewer than nproc_per_node 2" in r.stderr and "--exclusive" in r.stderr, r.stderr
    run_id = next(l.split()[2] for l in r.stderr.splitlines() if " submitted as Slurm job " in l)
    data = status(tmp_path, run_id)
    assert data["state"] == "failed" and "preflight failed" in data["message"], data


def test_no_node_count_outside_an_allocation_is_exit_2(lab, tmp_path):
    r = clusterrun(tmp_path, "up", "slurm", "x.py", timeout=60)
    assert r.returncode == 2
    assert "not inside a Slurm allocation, and nothing says how many nodes to submit for" in r.stderr
    assert lab.jobs() == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
