"""End-to-end: `clusterrun stacks` and `up --hang-timeout` on the sshd test cluster (gloo, CPU).

The job: 2 nodes x 2 ranks; rank 3 sleeps in `wait_for_shard` until a file appears,
ranks 0-2 wait for it in a barrier. That is a hang as users meet it: one rank stuck,
every other rank waiting in a collective, nothing printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kit import Controller, assert_nothing_left, hosts_file, up, write

pytestmark = pytest.mark.e2e

HANG = """\
    import os, sys, time
    import torch.distributed as dist

    def wait_for_shard(path):
        while not os.path.exists(path):
            time.sleep(0.1)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"up {rank}", flush=True)
    if rank == 3:
        wait_for_shard(sys.argv[1])
    dist.barrier()
    print(f"done {rank}", flush=True)
"""


# What the hang watch saw, after where each rank is (hangwatch.py: silence alone is not a hang).
SEEN = (r"over [\d.]+s between two samples no rank worked \(no main thread moved or did I/O\): "
        r"rank 3 stayed in wait_for_shard \(hang\.py:6\) with (no|[\d.]+s of) CPU time, outside any "
        r"collective; ranks 0-2 stayed in barrier")


def start_hung(cluster, ctl: Controller, tmp_path, **hosts_top) -> tuple[str, object]:
    script = write(tmp_path / "hang.py", HANG)
    release = tmp_path / "release"
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2, **hosts_top)
    r = ctl.run("up", "--detach", str(hosts), str(script), str(release))
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = r.stdout.strip().splitlines()[-1]
    ctl.wait_for(lambda: all(f"up {g}" in ctl.rank_log(run_id, g) for g in range(4)), "every rank up")
    return run_id, release


def groups(stdout: str) -> list[tuple[str, list[str]]]:
    """(header, frame lines) per group of the stacks output."""
    out: list[tuple[str, list[str]]] = []
    for line in stdout.splitlines():
        if line and not line.startswith(" "):
            out.append((line, []))
        elif line.strip() and out:
            out[-1][1].append(line.strip())
    return out


def check_stacks_and_release(cluster, ctl: Controller, run_id: str, release) -> None:
    n1, n2 = cluster.names[:2]
    r = ctl.run("stacks", run_id)
    assert r.returncode == 0, r.stdout + r.stderr
    (odd, odd_frames), (rest, rest_frames) = groups(r.stdout)
    assert odd == f"rank 3 ({n2}): read by faulthandler"
    assert re.fullmatch(r".*/hang\.py:\d+ in <module>", odd_frames[0])
    assert re.fullmatch(r".*/hang\.py:6 in wait_for_shard", odd_frames[-1]), odd_frames
    assert rest == f"ranks 0-2 ({n1}, {n2}): read by faulthandler"
    assert rest_frames[-1].endswith(" in barrier"), rest_frames
    saved = re.search(r"saved in (\S+)", r.stderr)
    assert saved and open(saved[1]).read() == r.stdout

    only = ctl.run("stacks", "--rank", "3", run_id)
    assert only.returncode == 0, only.stderr
    assert [h for h, _ in groups(only.stdout)] == [f"rank 3 ({n2}): read by faulthandler"]

    # Taking stacks left the job undisturbed: released, it finishes normally.
    release.touch()
    ctl.wait_for(lambda: ctl.status(run_id)["state"] != "running", "the run to end")
    st = ctl.status(run_id)
    assert st["state"] == "succeeded", st
    assert all(f"done {g}" in ctl.rank_log(run_id, g) for g in range(4))


def test_stacks_group_the_waiting_ranks_and_name_the_stuck_one(cluster, ctl, tmp_path):
    run_id, release = start_hung(cluster, ctl, tmp_path)
    st = ctl.status(run_id)
    assert set(st["nodes"][0]["quiet"]) == {"0", "1"} and all(
        q is not None for n in st["nodes"] for q in n["quiet"].values())
    check_stacks_and_release(cluster, ctl, run_id, release)
    assert_nothing_left(cluster)


def test_stacks_as_a_user_who_may_not_ptrace_and_without_py_spy(cluster, tmp_path, crtuser):
    """The workers dump their own stacks: no ptrace, no root, no py-spy needed."""
    ctl = Controller(cluster, tmp_path)
    run_id, release = start_hung(cluster, ctl, tmp_path, user=crtuser)
    check_stacks_and_release(cluster, ctl, run_id, release)
    assert_nothing_left(cluster)


@pytest.mark.transports("paramiko")      # the hang watch; stacks over openssh: test_stacks_group_...
def test_a_hang_timeout_with_on_hang_kill_ends_the_run_saying_who_was_stuck(cluster, tmp_path):
    script = write(tmp_path / "hang.py", HANG)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = up(cluster, tmp_path, "--hang-timeout", "15s", "--on-hang", "kill", str(hosts), str(script),
           str(tmp_path / "never"))
    assert r.returncode == 1, r.stdout + r.stderr
    n2 = cluster.names[1]
    diag = next(l for l in r.stderr.splitlines() if l.startswith("clusterrun: no output for ")
                and "not hung" not in l)
    assert re.fullmatch(rf"clusterrun: no output for [\d.]+s: rank 3 \({n2}\) is in wait_for_shard "
                        r"\(hang\.py:6\); ranks 0-2 wait in barrier; " + SEEN, diag), r.stderr
    assert any(l.startswith("clusterrun: the run hung (no output for ") for l in r.stderr.splitlines())
    assert "done" not in r.stdout
    assert_nothing_left(cluster)


MODULE = """\
    import torch.distributed as dist
    dist.init_process_group("gloo")
    print(f"module {__name__} {__spec__.name} rank {dist.get_rank()}", flush=True)
"""

SPAWN = """\
    import multiprocessing as mp
    import torch.distributed as dist

    class Shard:                        # lives in __main__: pickled by reference
        def __init__(self, n):
            self.n = n

    def square(s):
        return Shard(s.n * s.n)

    if __name__ == "__main__":
        dist.init_process_group("gloo")
        with mp.get_context("spawn").Pool(2) as pool:
            out = pool.map(square, [Shard(i) for i in range(4)])
        print(f"spawned {[s.n for s in out]} rank {dist.get_rank()}", flush=True)
"""


@pytest.mark.transports("paramiko")      # the launch arrangement, not the transport
def test_modules_and_spawned_main_classes_run_unchanged_under_the_stack_handler(cluster, tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg / "train.py", MODULE)
    spawn = write(tmp_path / "spawn.py", SPAWN)
    hosts = hosts_file(tmp_path, [{"host": n, "workdir": str(tmp_path)} for n in cluster.names[:2]],
                       nproc_per_node=1)
    m = up(cluster, tmp_path, "-m", str(hosts), "pkg.train")
    assert m.returncode == 0, m.stdout + m.stderr
    assert sorted(l.split("] ", 1)[1] for l in m.stdout.splitlines() if "] module " in l) == [
        "module __main__ pkg.train rank 0", "module __main__ pkg.train rank 1"]
    s = up(cluster, tmp_path, str(hosts), str(spawn))
    assert s.returncode == 0, s.stdout + s.stderr
    assert sorted(l.split("] ", 1)[1] for l in s.stdout.splitlines() if "] spawned " in l) == [
        "spawned [0, 1, 4, 9] rank 0", "spawned [0, 1, 4, 9] rank 1"]
    assert "sitecustomize" not in s.stdout + s.stderr + m.stdout + m.stderr
    assert_nothing_left(cluster)


@pytest.fixture(scope="session")
def py_spy(tmp_path_factory) -> str:
    """py-spy installed with pip into a directory of the test's own: its bin directory."""
    target = tmp_path_factory.mktemp("py-spy")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "--target", str(target), "py-spy"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0 or not (target / "bin" / "py-spy").exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot install py-spy: {pip.stderr[-500:]}")
        pytest.skip("cannot install py-spy (offline?)")
    return str(target / "bin")


@pytest.mark.transports("paramiko")      # how a rank is read, not how the node is reached
def test_native_stacks_are_read_by_py_spy_where_it_is_and_the_job_runs_on(cluster, ctl, tmp_path, py_spy):
    # The nodes find py-spy on the PATH their login (and setup) gives the agent.
    run_id, release = start_hung(cluster, ctl, tmp_path, setup=f"export PATH={py_spy}:$PATH")
    r = ctl.run("stacks", "--native", "--rank", "3", run_id)
    assert r.returncode == 0, r.stdout + r.stderr
    ((header, frames),) = groups(r.stdout)
    assert header == f"rank 3 ({cluster.names[1]}): read by py-spy"
    assert any(re.fullmatch(r".*/hang\.py:6 in wait_for_shard", f) for f in frames), frames
    release.touch()
    ctl.wait_for(lambda: ctl.status(run_id)["state"] != "running", "the run to end")
    assert ctl.status(run_id)["state"] == "succeeded"
    assert_nothing_left(cluster)


@pytest.mark.transports("paramiko")
def test_a_detached_runs_collector_watches_for_hangs(cluster, ctl, tmp_path):
    run_id, release = start_hung(cluster, ctl, tmp_path, hang_timeout="15s")
    ctl.wait_for(lambda: ctl.status(run_id)["hang"] is not None, "the collector to find the hang", timeout=120)
    hang = ctl.status(run_id)["hang"]
    assert re.fullmatch(rf"no output for [\d.]+s: rank 3 \({cluster.names[1]}\) is in wait_for_shard "
                        r"\(hang\.py:6\); ranks 0-2 wait in barrier; " + SEEN, hang["diagnosis"]), hang
    assert "hang: no output for" in ctl.run("status", run_id).stdout
    release.touch()                         # on_hang: report: the run goes on
    ctl.wait_for(lambda: ctl.status(run_id)["state"] != "running", "the run to end")
    assert ctl.status(run_id)["state"] == "succeeded"
    assert_nothing_left(cluster)
