"""End-to-end: a run as something to manage, on the sshd test cluster.

detach, ps, status, logs (--rank, -f from another shell), kill (only that run,
nothing left), fail fast, Ctrl-C, a dropped SSH connection, and `up` killed
outright. The workers are plain Python scripts under real torchrun.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from kit import TICKER, assert_nothing_left, hosts_file, tagged_ticks, write

pytestmark = pytest.mark.e2e


def ticks(lines: list[str], rank: int) -> list[int]:
    return [int(l.split()[2]) for l in lines if l.startswith(f"tick {rank} ")]


def test_detach_status_logs_follow_and_logs_after_the_end(cluster, ctl, tmp_path):
    script = write(tmp_path / "ticker.py", TICKER)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = ctl.run("up", "--detach", str(hosts), str(script), "40", "0.1")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip().splitlines()[-1]          # the run id is the last line on stdout
    st = ctl.status(run_id)
    assert st["run"] == run_id and st["state"] in ("running", "succeeded")
    assert [n["node"] for n in st["nodes"]] == cluster.names[:2]
    ps = ctl.run("ps")
    assert run_id in ps.stdout

    # Another shell follows rank 3 live; it ends by itself when the run ends.
    f = ctl.run("logs", "-f", "--rank", "3", run_id)
    assert f.returncode == 0, f.stderr
    assert tagged_ticks(f.stdout, 3) == list(range(40))
    assert f"[{cluster.names[1]} g3 l1] done 3" in f.stdout.splitlines()
    assert not tagged_ticks(f.stdout, 2)

    # After the end: status says so, and the logs are still there, per rank and per node.
    ctl.wait_for(lambda: ctl.status(run_id)["state"] == "succeeded", "the run to be recorded as ended")
    st = ctl.status(run_id)
    assert all(n["state"] == "exited" and n["code"] == 0 for n in st["nodes"])
    for rank in range(4):
        assert ticks(ctl.rank_log(run_id, rank), rank) == list(range(40))
    two = ctl.run("logs", "--rank", "0", "--rank", "2", "--tail", "1", run_id)
    assert two.stdout.splitlines() == [f"[{cluster.names[0]} g0 l0] done 0", f"[{cluster.names[1]} g2 l0] done 2"]
    node = ctl.run("logs", "--node", cluster.names[1], run_id)
    assert tagged_ticks(node.stdout, 2) == list(range(40)) and tagged_ticks(node.stdout, 3) == list(range(40))
    assert not tagged_ticks(node.stdout, 0)
    assert_nothing_left(cluster)


def test_a_detached_run_keeps_its_collector_when_other_commands_race_the_hand_off(cluster, ctl, tmp_path):
    """`up -d` hands its collector lock to the background collector; a `status` or `logs`
    taking the lock at that moment (here: a process grabbing it whenever it can, as a
    stream of such commands would) must not leave the run without one."""
    runs = tmp_path / "crhome" / "runs"
    stop = threading.Event()

    def grab() -> None:
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            for lock in runs.glob("*/collector.lock"):
                if not (lock.parent / "plan.json").exists():
                    continue                     # as `status` does: only runs with a plan
                fd = os.open(lock, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    time.sleep(0.3)              # a slow status holding it
                except BlockingIOError:
                    pass
                finally:
                    os.close(fd)
            time.sleep(0.002)

    grabber = threading.Thread(target=grab, daemon=True)
    grabber.start()
    try:
        script = write(tmp_path / "ticker.py", TICKER)
        hosts = hosts_file(tmp_path, cluster.names[:2])
        r = ctl.run("up", "--detach", str(hosts), str(script), "20", "0.1")
        assert r.returncode == 0, r.stderr
        run_id = r.stdout.strip().splitlines()[-1]
        # Only a collector records the end: without one the run would stay "running".
        ctl.wait_for(lambda: (runs / run_id / "result.json").exists(), "the run's end to be recorded", 90)
    finally:
        stop.set()
        grabber.join(5)
    assert ctl.status(run_id)["state"] == "succeeded"
    for rank in (0, 1):
        assert ticks(ctl.rank_log(run_id, rank), rank) == list(range(20))


def test_kill_ends_only_that_run_and_leaves_nothing(cluster, ctl, tmp_path):
    script = write(tmp_path / "ticker.py", TICKER)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    hosts_b = hosts_file(tmp_path, cluster.names[:2], "hosts_b.yaml", nproc_per_node=2)  # another port
    a = ctl.run("up", "-d", str(hosts), str(script), "100000", "0.05").stdout.split()[-1]
    b = ctl.run("up", "-d", str(hosts_b), str(script), "100000", "0.05").stdout.split()[-1]
    ctl.wait_for(lambda: len(ctl.rank_log(b, 3)) > 5, "run b to print")

    k = ctl.run("kill", "--grace", "3", a)
    assert k.returncode == 0, k.stderr
    st_a = ctl.status(a)
    assert st_a["state"] == "killed" and all(n["state"] == "killed" for n in st_a["nodes"])
    # Run b is untouched and still printing.
    st_b = ctl.status(b)
    assert st_b["state"] == "running", st_b
    before = len(ctl.rank_log(b, 3))
    ctl.wait_for(lambda: len(ctl.rank_log(b, 3)) > before, "run b to keep printing")

    k = ctl.run("kill", b)          # the latest run would do too; name it anyway
    assert k.returncode == 0, k.stderr
    assert ctl.status(b)["state"] == "killed"
    # Zero processes of either run in any node's namespace, and no job directories.
    assert_nothing_left(cluster)
    assert not list(Path("~/.clusterrun/jobs").expanduser().glob(f"{a}*"))
    again = ctl.run("kill", a)
    assert again.returncode == 0 and "already ended" in again.stderr


def test_a_rank_that_exits_while_the_others_sleep_ends_the_run(cluster, ctl, tmp_path):
    script = write(tmp_path / "sleepers.py", """\
        import os, sys, time
        rank = int(os.environ["RANK"])
        print(f"rank {rank} up", flush=True)
        if rank == 1:
            time.sleep(1)
            print("out of memory, giving up", flush=True)
            sys.exit(3)
        time.sleep(600)
    """)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = ctl.run("up", str(hosts), str(script), timeout=120)    # the others would sleep 600 s
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.splitlines()
    first = next(l for l in err if l.startswith("clusterrun: rank "))
    assert first == f"clusterrun: rank 1 ({cluster.names[0]}, local rank 1) exited with code 3"
    assert "  | out of memory, giving up" in err
    assert any(l.startswith(f"clusterrun: node {cluster.names[1]} ") and "stopped after rank 1 failed" in l
               for l in err), r.stderr
    assert_nothing_left(cluster)


def test_no_fail_fast_keeps_the_other_nodes_running(cluster, ctl, tmp_path):
    script = write(tmp_path / "one_fails.py", """\
        import os, sys, time
        rank = int(os.environ["RANK"])
        if rank == 0:
            sys.exit(5)
        time.sleep(4)
        print(f"finished {rank}", flush=True)
    """)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=1)
    r = ctl.run("up", "--no-fail-fast", str(hosts), str(script))
    assert r.returncode == 1
    assert f"[{cluster.names[1]} g1 l0] finished 1" in r.stdout.splitlines()
    assert f"clusterrun: rank 0 ({cluster.names[0]}, local rank 0) exited with code 5" in r.stderr


def test_ctrl_c_tears_every_node_down_and_exits_130(cluster, ctl, tmp_path):
    p = ctl.ticker(cluster, 2, 100000, 0.05, nproc=2)
    p.wait_for(" tick 3 3")
    p.proc.send_signal(signal.SIGINT)
    out, err = p.finish(60)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert_nothing_left(cluster)
    st = ctl.status()
    assert st["state"] == "killed" and all(n["state"] == "killed" for n in st["nodes"]), st
    assert re.search(r"^clusterrun: node \S+ \(ranks \d-\d\) was killed \(Ctrl-C\)$", err, re.M), err


@pytest.mark.transports("paramiko")
def test_sigterm_to_up_stops_every_node_as_ctrl_c_does(cluster, ctl, tmp_path):
    """A cancelled CI job or `timeout` sends SIGTERM: the run is torn down, not left running."""
    p = ctl.ticker(cluster, 2, 100000, 0.05)
    p.wait_for(" tick 1 3")
    p.proc.send_signal(signal.SIGTERM)
    out, err = p.finish(60)
    assert p.returncode == 130, err
    assert "clusterrun: interrupted: stopping every node (Ctrl-C again to stop waiting)" in err.splitlines(), err
    assert_nothing_left(cluster)
    assert ctl.status()["state"] == "killed"


def test_ctrl_c_while_the_nodes_are_checked_starts_nothing_and_keeps_no_run(cluster, ctl, tmp_path):
    """Ctrl-C while one node's `setup:` still runs (the preflight waits for every node): exit
    130, no run left in `ps`, and once that setup ends, nothing starts there."""
    script = write(tmp_path / "never.py", "print('this should never run', flush=True)\n")
    in_setup = tmp_path / "in-setup"
    hosts = hosts_file(tmp_path, [cluster.names[0], {"host": cluster.names[1],
                                                      "setup": f"touch {in_setup} && sleep 4"}])
    p = ctl.start("up", str(hosts), str(script))
    deadline = time.monotonic() + 60
    while not in_setup.exists():
        assert p.proc.poll() is None and time.monotonic() < deadline, "".join(p.err)
        time.sleep(0.1)
    p.proc.send_signal(signal.SIGINT)
    out, err = p.finish(60)
    assert p.returncode == 130, err
    assert "clusterrun: interrupted while the nodes were checked: nothing was started" in err.splitlines(), err
    assert "this should never run" not in out
    assert not list((tmp_path / "crhome" / "runs").glob("*")), "no run is kept"
    assert "no runs yet" in ctl.run("ps").stdout
    time.sleep(4)                   # the setup ends; the agent then finds no "go"
    assert_nothing_left(cluster)


def test_ssh_session_killed_on_the_node_mid_run_loses_no_line(cluster, ctl, tmp_path):
    node = cluster.names[1]
    p = ctl.ticker(cluster, 2, 300, 0.02)
    p.wait_for(" tick 1 50")
    # Kill the sshd process serving our connection on that node (not its listener).
    sessions = [pid for pid in cluster.leftover_pids(node)
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd")]
    assert sessions, cluster.describe_pids(cluster.leftover_pids(node))
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)
    stdout, err = p.finish(120)
    assert p.returncode == 0, err
    for rank in (0, 1):
        assert tagged_ticks(stdout, rank) == list(range(300)), f"rank {rank}"
    # The user is told what happens meanwhile, once each way.
    said = [l for l in err.splitlines() if "connect" in l]
    assert said == [f"clusterrun: lost the connection to {node}; reconnecting (for up to 60s, the job goes on there)",
                    f"clusterrun: reconnected to {node}: its lines resume where they stopped"], err
    assert_nothing_left(cluster)


@pytest.mark.transports("paramiko")
def test_status_and_kill_of_an_abandoned_run_never_wait_for_its_setup(cluster, ctl, tmp_path):
    """`setup:` that now hangs (pip waiting on an index, an NFS stall) must not hang `status`
    or `kill`: they only look at or end what the job left, and run no setup."""
    script = write(tmp_path / "ticker.py", TICKER)
    stall = tmp_path / "stall"
    hosts = hosts_file(tmp_path, cluster.names[:2], setup=f"if [ -e {stall} ]; then sleep 120; fi")
    p = ctl.start("up", str(hosts), str(script), "100000", "0.05")
    p.wait_for(" tick 1 3")
    p.proc.kill()               # nobody collects the run from now on
    p.finish()
    stall.touch()
    st = ctl.run("status", "--json", timeout=60)
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "running", st.stderr
    k = ctl.run("kill", timeout=60)
    assert k.returncode == 0, k.stdout + k.stderr
    assert_nothing_left(cluster)


def test_up_killed_outright_the_job_runs_on_and_can_be_followed_and_killed(cluster, ctl, tmp_path):
    p = ctl.ticker(cluster, 2, 150, 0.05)
    p.wait_for(" tick 1 5")
    p.proc.kill()               # SIGKILL: no chance to clean up
    p.finish()
    run_id = ctl.run("ps").stdout.splitlines()[1].split()[0]
    assert ctl.status(run_id)["state"] == "running"
    # From a new shell: follow it to its end, every line once and in order.
    f = ctl.run("logs", "-f", run_id)
    assert f.returncode == 0, f.stderr
    for rank in (0, 1):
        assert tagged_ticks(f.stdout, rank) == list(range(150))
    assert ctl.status(run_id)["state"] == "succeeded"

    # And a second run whose `up` is killed is ended by `clusterrun kill` from a new shell.
    ctl.abandoned_run(cluster, after=" tick 1 2")
    k = ctl.run("kill")
    assert k.returncode == 0, k.stderr
    assert_nothing_left(cluster)


def test_ctrl_c_on_logs_follow_stops_following_not_the_run(cluster, ctl, tmp_path):
    ctl.abandoned_run(cluster, after=" tick 1 2")   # `logs -f` becomes its collector
    f = ctl.start("logs", "-f")
    f.wait_for(" tick 0 ")
    f.proc.send_signal(signal.SIGINT)
    f.finish(60)
    assert f.returncode == 130
    assert ctl.status()["state"] == "running"
    assert ctl.run("kill").returncode == 0
    assert ctl.status()["state"] == "killed"
    assert_nothing_left(cluster)
