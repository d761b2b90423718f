"""End-to-end: what `up --hang-timeout 5s --on-hang kill` calls a hang, on the sshd test cluster.

Silence is not a hang. Three jobs of 2 nodes x 2 ranks (gloo, CPU), as users meet them:

- Rich's progress bar under Lightning: a refresh thread on rank 0 that draws nothing
  (stdout is not a terminal) while every main thread computes silently, for more than
  three hang timeouts: it runs to the end;
- one rank stuck in a sleep while the others wait for it in all_reduce: it is stopped,
  and the report says what was seen;
- an import slower than the hang timeout: start-up has its own, longer limit.
"""

from __future__ import annotations

import re

import pytest

from kit import assert_nothing_left, hosts_file, up, write

pytestmark = pytest.mark.e2e

TIMEOUT = "5s"

# Like Rich's Live refresh thread: ten times a second it builds the bar, and shows
# nothing, since stdout is not a terminal. The main thread computes in one place (the
# `while` line: its stack does not change) for longer than three hang timeouts.
SILENT_BAR = """\
    import sys, threading, time
    import torch, torch.distributed as dist

    class Refresh(threading.Thread):
        def __init__(self):
            super().__init__(daemon=True)
            self.done = threading.Event()

        def run(self):
            while not self.done.wait(0.1):
                self.frame = "".join(f"{i:3d}% |{'#' * (i // 10):10}|" for i in range(20))

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"epoch 0 rank {rank}", flush=True)
    bar = Refresh()
    if rank == 0:
        bar.start()
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end: pass
    t = torch.ones(1)
    dist.all_reduce(t)
    bar.done.set()
    print(f"done rank {rank} sum {t.item():g}", flush=True)
"""

# Rank 3 sleeps where the others already wait for it in all_reduce.
SLEEPER = """\
    import sys, time
    import torch, torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"up {rank}", flush=True)
    if rank == 3:
        time.sleep(float(sys.argv[1]))
    t = torch.ones(1)
    dist.all_reduce(t)
    print(f"done {rank}", flush=True)
"""

# An import that takes three hang timeouts, before any line (lightning's took 17 s).
SLOW_DEP = """\
    import time
    time.sleep(15)
"""
SLOW_IMPORT = """\
    import slow_dep  # noqa: F401
    import torch, torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    print(f"done {dist.get_rank()} sum {t.item():g}", flush=True)
"""


def run(cluster, tmp_path, name: str, text: str, *args: str):
    script = write(tmp_path / name, text)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    return up(cluster, tmp_path, "--hang-timeout", TIMEOUT, "--on-hang", "kill", str(hosts), str(script),
              *args)


def test_a_silent_progress_bar_over_computing_ranks_is_not_a_hang(cluster, tmp_path):
    r = run(cluster, tmp_path, "silent_bar.py", SILENT_BAR, "18")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(f"done rank {g} sum 4" in r.stdout for g in range(4)), r.stdout
    assert "the run hung" not in r.stderr and "--on-hang kill: stopping" not in r.stderr, r.stderr
    # what the watch saw while every rank computed silently: their CPU time moving
    said = [l for l in r.stderr.splitlines() if "but the job is not hung: " in l]
    assert any(re.fullmatch(r"clusterrun: no output for [\d.]+s, but the job is not hung: .*working "
                            r"\(CPU time moving, up to [\d.]+s in [\d.]+s\).*", l) for l in said), r.stderr
    assert_nothing_left(cluster)


def test_a_rank_asleep_while_the_others_wait_in_all_reduce_is_stopped_and_named(cluster, tmp_path):
    r = run(cluster, tmp_path, "sleeper.py", SLEEPER, "600")
    assert r.returncode == 1, r.stdout + r.stderr
    n2 = cluster.names[1]
    line = next((l for l in r.stderr.splitlines() if l.startswith("clusterrun: no output for ")
                 and "not hung" not in l), "")
    m = re.fullmatch(
        rf"clusterrun: no output for ([\d.]+)s: rank 3 \({n2}\) is in <module> \(sleeper\.py:8\); "
        r"ranks 0-2 wait in all_reduce; over [\d.]+s between two samples no rank worked \(no main "
        r"thread moved or did I/O\): rank 3 stayed in <module> \(sleeper\.py:8\) with (no|[\d.]+s of) "
        r"CPU time, outside any collective; ranks 0-2 stayed in all_reduce", line)
    assert m, r.stderr
    assert float(m[1]) < 50, "a rank that printed is past start-up: the hang timeout applies, not 10x"
    assert any(l.startswith("clusterrun: the run hung (no output for ") for l in r.stderr.splitlines())
    assert "done" not in r.stdout
    assert_nothing_left(cluster)


def test_an_import_slower_than_the_hang_timeout_is_start_up_not_a_hang(cluster, tmp_path):
    write(tmp_path / "slow_dep.py", SLOW_DEP)
    r = run(cluster, tmp_path, "slow_import.py", SLOW_IMPORT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(f"done {g} sum 4" in r.stdout for g in range(4)), r.stdout
    assert "the run hung" not in r.stderr and "--on-hang kill: stopping" not in r.stderr, r.stderr
    assert re.search(r"clusterrun: no output for [\d.]+s: ranks? [\d, -]+ still starting \(no line and no "
                     r"collective yet\); a hang is called only after the start-up limit, 50s "
                     r"\(10x --hang-timeout\)", r.stderr), r.stderr
    assert_nothing_left(cluster)
