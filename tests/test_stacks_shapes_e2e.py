"""End-to-end: `clusterrun stacks` on the shapes real frameworks give a job (sshd test cluster, gloo, CPU).

- A progress bar's thread: tqdm starts a monitor thread (TMonitor), Rich a refresh thread, in
  the rank that shows the bar. Ranks are grouped by their main thread, so such a thread neither
  makes its rank a group of its own nor puts it before the rank that is really stuck.
- An import in progress: a rank deep in an import chain (`import lightning`, 17 s on a busy node)
  has hundreds of importlib frames, and faulthandler writes only the innermost 100 of a thread.
  importlib's frames are folded; the script's own frames are still shown, read in full by the
  worker's Python-level handler, and where that cannot answer (the main thread blocks in C
  code) the dump says it was cut.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import pytest

from kit import Controller, assert_nothing_left, hosts_file, write

pytestmark = pytest.mark.e2e

# Rank 0 has a thread of tqdm's TMonitor's shape, rank 1 one of Rich's _RefreshThread's (both
# wait on an Event in a loop); rank 3 sleeps in wait_for_shard; ranks 0-2 wait in all_reduce.
SHAPES = """\
    import os, sys, threading, time
    import torch
    import torch.distributed as dist


    class TMonitor(threading.Thread):
        def __init__(self):
            super().__init__(daemon=True)
            self.was_killed = threading.Event()

        def run(self):
            while not self.was_killed.wait(10):
                pass


    class _RefreshThread(threading.Thread):
        def __init__(self):
            super().__init__(daemon=True)
            self.done = threading.Event()

        def run(self):
            while not self.done.wait(1 / 10):
                pass


    def wait_for_shard(path):
        while not os.path.exists(path):
            time.sleep(0.1)


    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        TMonitor().start()
    if rank == 1:
        _RefreshThread().start()
    print(f"up {rank}", flush=True)
    if rank == 3:
        wait_for_shard(sys.argv[1])
    dist.all_reduce(torch.ones(1))
    print(f"done {rank}", flush=True)
"""

# Ranks 1 and 2 import deep.m0, which imports deep.m1, ... deep.m59. In the innermost module
# rank 1 sleeps until the release file appears (its main thread runs Python code: the handler
# answers), rank 2 waits in a barrier (it blocks in C: only faulthandler answers). Ranks 0 and 3
# wait in the same barrier from the script.
DEPTH = 60
IMPORTS = """\
    import sys
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"up {rank}", flush=True)
    if rank in (1, 2):
        import deep.m0
    else:
        dist.barrier()
    print(f"done {rank}", flush=True)
"""
INNERMOST = """\
    import os, sys, time
    import torch.distributed as dist

    if dist.get_rank() == 1:
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.1)
    dist.barrier()
"""


def groups(stdout: str) -> list[tuple[str, list[str]]]:
    """(header, the lines under it, stripped) per group of the stacks output."""
    out: list[tuple[str, list[str]]] = []
    for line in stdout.splitlines():
        if line and not line.startswith(" "):
            out.append((line, []))
        elif line.strip() and out:
            out[-1][1].append(line.strip())
    return out


@contextlib.contextmanager
def started(cluster, ctl: Controller, tmp_path, script, **hosts_top) -> Iterator[tuple[str, Path]]:
    """A detached run of `script` on 2 nodes x 2 ranks, every rank up; if the test fails, its
    release file is made and the run killed, so that no rank is left to fail the tests after it."""
    release = tmp_path / "release"
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2, **hosts_top)
    r = ctl.run("up", "--detach", str(hosts), str(script), str(release))
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = r.stdout.strip().splitlines()[-1]
    try:
        ctl.wait_for(lambda: all(f"up {g}" in ctl.rank_log(run_id, g) for g in range(4)), "every rank up")
        yield run_id, release
    except BaseException:
        release.touch()
        ctl.run("kill", run_id)
        raise


def release_and_check_it_ends_well(ctl: Controller, run_id: str, release) -> None:
    release.touch()
    ctl.wait_for(lambda: ctl.status(run_id)["state"] != "running", "the run to end")
    st = ctl.status(run_id)
    assert st["state"] == "succeeded", st
    assert all(f"done {g}" in ctl.rank_log(run_id, g) for g in range(4))


def test_a_progress_bar_thread_does_not_put_its_rank_before_the_stuck_one(cluster, ctl, tmp_path):
    script = write(tmp_path / "shapes.py", SHAPES)
    with started(cluster, ctl, tmp_path, script, hang_timeout="15s") as (run_id, release):
        check_progress_bar_job(cluster, ctl, run_id, release)
    assert_nothing_left(cluster)


def check_progress_bar_job(cluster, ctl: Controller, run_id: str, release: Path) -> None:
    n1, n2 = cluster.names[:2]
    r = ctl.run("stacks", run_id)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [h for h, _ in groups(r.stdout)] == [f"rank 3 ({n2}): read by faulthandler",
                                                f"ranks 0-2 ({n1}, {n2}): read by faulthandler"], r.stdout
    (stuck, stuck_lines), (rest, rest_lines) = groups(r.stdout)
    assert re.fullmatch(r".*/shapes\.py:\d+ in <module>", stuck_lines[0]), stuck_lines
    assert re.fullmatch(r".*/shapes\.py:\d+ in wait_for_shard", stuck_lines[-1]), stuck_lines
    # The main thread, then each other thread under the ranks that have it.
    assert rest_lines[0] == "main thread"
    assert re.fullmatch(r".*/shapes\.py:\d+ in <module>", rest_lines[1]), rest_lines
    assert re.fullmatch(r"\.\.\./site-packages/torch/distributed/distributed_c10d\.py:\d+ in all_reduce",
                        rest_lines[rest_lines.index("thread 2 of 2 (rank 0 only)") - 1]), rest_lines
    monitor = rest_lines[rest_lines.index("thread 2 of 2 (rank 0 only)") + 1:
                         rest_lines.index("thread 2 of 2 (rank 1 only)")]
    assert any(re.fullmatch(r".*/shapes\.py:\d+ in run", l) for l in monitor), monitor
    assert monitor[-1].endswith(" in wait"), monitor
    refresh = rest_lines[rest_lines.index("thread 2 of 2 (rank 1 only)") + 1:]
    assert any(re.fullmatch(r".*/shapes\.py:\d+ in run", l) for l in refresh), refresh

    # The hang watch groups the same way: its one-line diagnosis names rank 3 first. (On a busy
    # machine the watch may also have reported the ranks' start-up, `import torch`, as a hang:
    # the report that counts is the one of the ranks at work.)
    def diagnosis() -> str:
        return (ctl.status(run_id)["hang"] or {}).get("diagnosis", "")

    ctl.wait_for(lambda: "wait_for_shard" in diagnosis(), "the collector to find the hang", timeout=180)
    diag = diagnosis()
    assert re.search(rf"(^|: )rank 3 \({n2}\) is in wait_for_shard \(shapes\.py:\d+\); ranks 0-2 wait in all_reduce",
                     diag), diag
    release_and_check_it_ends_well(ctl, run_id, release)


def test_a_rank_deep_in_an_import_chain_shows_its_script_and_folds_importlib(cluster, ctl, tmp_path):
    pkg = tmp_path / "deep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for i in range(DEPTH - 1):
        (pkg / f"m{i}.py").write_text(f"import deep.m{i + 1}\n")
    write(pkg / f"m{DEPTH - 1}.py", INNERMOST)
    script = write(tmp_path / "imports.py", IMPORTS)
    with started(cluster, ctl, tmp_path, script) as (run_id, release):
        check_deep_import_job(cluster, ctl, run_id, release)
    assert_nothing_left(cluster)


def check_deep_import_job(cluster, ctl: Controller, run_id: str, release: Path) -> None:
    n1, n2 = cluster.names[:2]
    r = ctl.run("stacks", run_id)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [h for h, _ in groups(r.stdout)] == [
        f"rank 1 ({n1}): read by Python (faulthandler stops at 100 frames)",
        f"rank 2 ({n2}): read by faulthandler",
        f"ranks 0, 3 ({n1}, {n2}): read by faulthandler"], r.stdout
    (_, full_lines), (_, cut_lines), (_, rest_lines) = groups(r.stdout)
    assert "<frozen importlib" not in r.stdout
    module = re.compile(r".*/deep/m(\d+)\.py:\d+ in <module>")
    fold = re.compile(r"\.\.\. \d+ importlib frames \.\.\.")

    # Rank 1 sleeps: read in full by its Python-level handler, from the script's own line down.
    assert re.fullmatch(r".*/imports\.py:8 in <module>", full_lines[0]), full_lines[:3]
    chain = full_lines[1:]
    assert [int(m[1]) for l in chain if (m := module.fullmatch(l))] == list(range(DEPTH))
    assert all(fold.fullmatch(l) for l in chain[0::2]), chain   # one line per import in progress
    assert re.fullmatch(rf".*/deep/m{DEPTH - 1}\.py:6 in <module>", full_lines[-1]), full_lines[-3:]

    # Rank 2 waits in a barrier (in C): faulthandler's 100 innermost frames, said to be cut.
    assert cut_lines[0] == "... outer frames not shown: faulthandler stops at 100 frames ..."
    assert not any("imports.py" in l for l in cut_lines)
    assert any(fold.fullmatch(l) for l in cut_lines) and any(module.fullmatch(l) for l in cut_lines)
    assert re.fullmatch(rf".*/deep/m{DEPTH - 1}\.py:7 in <module>", cut_lines[-3]), cut_lines[-3:]
    assert re.fullmatch(r"\.\.\./site-packages/torch/distributed/distributed_c10d\.py:\d+ in barrier",
                        cut_lines[-1]), cut_lines[-3:]

    assert re.fullmatch(r".*/imports\.py:10 in <module>", rest_lines[0]), rest_lines
    release_and_check_it_ends_well(ctl, run_id, release)
