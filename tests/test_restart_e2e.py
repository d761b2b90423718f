"""End-to-end: whole-job restarts (`up --max-restarts`) and spare nodes, on the sshd test cluster.

The restart logic is the controller's, the same on either transport: these tests run on
paramiko only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import TESTCLUSTER
from kit import assert_nothing_left, hosts_file, write

pytestmark = [pytest.mark.e2e, pytest.mark.transports("paramiko")]

FLAKY = """\
    import os, sys, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, attempt = dist.get_rank(), int(os.environ["CLUSTERRUN_ATTEMPT"])
    print(f"rank {rank} attempt {attempt}", flush=True)
    if rank == 3 and attempt == 0:
        sys.exit(7)
    dist.barrier()
    print(f"rank {rank} done in attempt {attempt}", flush=True)
"""



def stderr_lines(r) -> list[str]:
    return r.stderr.splitlines()


def test_a_rank_that_fails_once_is_restarted_and_the_run_succeeds(cluster, ctl, tmp_path):
    script = write(tmp_path / "flaky.py", FLAKY)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = ctl.run("up", "--max-restarts", "2", "--restart-delay", "1", str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    n2 = cluster.names[1]
    assert (f"clusterrun: attempt 0 of 0-2 failed: rank 3 ({n2}, local rank 1) exited with code 7; "
            "restarting in 1s") in stderr_lines(r)
    assert f"[{n2} g3 l1] rank 3 done in attempt 1" in r.stdout.splitlines()

    def ours(text: str) -> list[str]:        # (torch's own warnings aside)
        return [l for l in text.splitlines() if l.startswith("---") or "] rank 3 " in l]

    logs = ctl.run("logs", "--rank", "3")
    assert ours(logs.stdout) == [
        "--- attempt 0 ---", f"[{n2} g3 l1] rank 3 attempt 0",
        "--- attempt 1 ---", f"[{n2} g3 l1] rank 3 attempt 1", f"[{n2} g3 l1] rank 3 done in attempt 1"]
    one = ctl.run("logs", "--rank", "3", "--attempt", "0")
    assert ours(one.stdout) == [f"[{n2} g3 l1] rank 3 attempt 0"]
    st = ctl.status()
    assert (st["state"], st["attempt"], st["max_restarts"]) == ("succeeded", 1, 2)
    assert "attempt 1 of 0-2" in ctl.run("status").stdout.splitlines()[0]
    assert_nothing_left(cluster)


def test_a_job_that_always_fails_exhausts_its_restarts(cluster, ctl, tmp_path):
    script = write(tmp_path / "bad.py", """\
        import os, sys
        print("attempt " + os.environ["CLUSTERRUN_ATTEMPT"], flush=True)
        sys.exit(3)
    """)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=1)
    r = ctl.run("up", "--max-restarts", "2", "--restart-delay", "1", str(hosts), str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    said = [l for l in stderr_lines(r) if l.startswith("clusterrun: attempt ")]
    assert [l.split(":")[1].strip() for l in said] == ["attempt 0 of 0-2 failed", "attempt 1 of 0-2 failed",
                                                       "attempt 2 of 0-2 failed too"]
    assert said[-1].endswith("no restart left")
    assert any(l.startswith("clusterrun: rank ") and l.endswith("exited with code 3") for l in stderr_lines(r))
    assert sorted(l.split("] ", 1)[1] for l in r.stdout.splitlines() if "] attempt " in l) == [
        "attempt 0", "attempt 0", "attempt 1", "attempt 1", "attempt 2", "attempt 2"]
    assert_nothing_left(cluster)


def test_kill_during_the_restart_delay_ends_everything(cluster, ctl, tmp_path):
    script = write(tmp_path / "bad.py", "import sys; sys.exit(3)\n")
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=1)
    p = ctl.start("up", "--max-restarts", "3", "--restart-delay", "60", str(hosts), str(script))
    deadline = time.monotonic() + 120
    while not any("restarting in 60s" in l for l in p.err):
        assert p.proc.poll() is None and time.monotonic() < deadline, "".join(p.err)
        time.sleep(0.2)
    k = ctl.run("kill")
    assert k.returncode == 0, k.stdout + k.stderr
    out, err = p.finish(30)
    assert p.returncode != 0, err
    assert "during the restart delay: no further attempt" in err
    assert "attempt 1 of" not in err
    assert_nothing_left(cluster)


SPARE_JOB = """\
    import os, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, attempt = dist.get_rank(), int(os.environ["CLUSTERRUN_ATTEMPT"])
    for i in range(3 if attempt else 100000):
        print(f"tick {rank} {i} attempt {attempt}", flush=True)
        time.sleep(0.1)
    dist.barrier()
    print(f"done {rank} attempt {attempt}", flush=True)
"""


def test_a_spare_takes_the_place_of_a_node_whose_sshd_died(cluster, ctl, tmp_path):
    n1, victim, spare, unfit = cluster.names[:4]
    ctl.short_reconnect_window()
    script = write(tmp_path / "spare.py", SPARE_JOB)
    # The first spare cannot run the job (no such python): the preflight passes it over.
    hosts = hosts_file(tmp_path, [n1, victim], nproc_per_node=2, max_restarts=1, restart_delay=1,
                       spares=[{"host": unfit, "python": "/nonexistent/bin/python3"}, spare])
    p = ctl.start("up", str(hosts), str(script))
    try:
        p.wait_for(f"[{victim} g3 l1] tick 3 5")
        # The machine goes away: its sshd, the job, the agent, the sessions.
        sshd = cluster.sshd_pid(victim)
        for pid in [sshd, *cluster.leftover_pids(victim)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        out, err = p.finish(240)
    finally:
        restart = subprocess.run([str(TESTCLUSTER), "start-sshd", victim, "--state", str(cluster.state)],
                                 capture_output=True, text=True, timeout=60)
        assert restart.returncode == 0, restart.stderr
    assert p.returncode == 0, out + err
    said = err.splitlines()
    assert f"clusterrun: spare {unfit} cannot stand in: python /nonexistent/bin/python3 not found" in said, err
    assert f"clusterrun: {victim} was lost; {spare} takes node_rank 1" in said, err
    # The spare runs the lost node's ranks, under its own name.
    assert {f"[{spare} g2 l0] done 2 attempt 1", f"[{spare} g3 l1] done 3 attempt 1",
            f"[{n1} g0 l0] done 0 attempt 1"} <= set(out.splitlines()), out
    st = ctl.status()
    assert st["replaced"] == {spare: victim} and [n["node"] for n in st["nodes"]] == [n1, spare]
    assert_nothing_left(cluster)


def test_a_detached_run_restarts_itself_and_keeps_no_secret(cluster, ctl, tmp_path):
    """The collector restarts the run; what it needs comes over a pipe, not the disk."""
    script = write(tmp_path / "flaky.py", FLAKY)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2, max_restarts=2, restart_delay=1)
    r = ctl.run("up", "--detach", "--env", "HF_TOKEN=hunter2-secret", str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = r.stdout.strip().splitlines()[-1]
    # Followed from the start, each attempt's lines come under their marker, as in plain `logs`.
    followed = ctl.run("logs", "-f", "--rank", "3", run_id)
    assert followed.returncode == 0 and ctl.status(run_id)["state"] == "succeeded", followed.stderr
    n2 = cluster.names[1]
    assert [l for l in followed.stdout.splitlines() if l.startswith("---") or "] rank 3 " in l] == [
        "--- attempt 0 ---", f"[{n2} g3 l1] rank 3 attempt 0",
        "--- attempt 1 ---", f"[{n2} g3 l1] rank 3 attempt 1", f"[{n2} g3 l1] rank 3 done in attempt 1"]
    assert ctl.status(run_id)["attempt"] == 1
    assert ctl.run("logs", "--rank", "3", run_id).stdout == followed.stdout
    home = tmp_path / "crhome"
    assert not [p for p in home.rglob("*") if p.is_file() and b"hunter2-secret" in p.read_bytes()]
    assert_nothing_left(cluster)
