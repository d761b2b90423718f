"""Unit: stacks on request (nodeagent's side with real processes; parsing, grouping, diagnosis)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusterrun import nodeagent
from clusterrun.hostsfile import parse_hosts
from clusterrun.options import LaunchOptions
from clusterrun.plan import make_plan
from clusterrun.run.stacks import CUT, Frame, RankStacks, diagnosis, group, parse, render, short_path, show

# The worker says "ready" from inside wait_for_shard, on the line where it then blocks (reading
# stdin): whenever the dump comes after "ready", that is the line it shows. (Saying it before the
# call let a dump on a busy machine catch the worker still in <module>.) A test that fails
# closes the pipe: the worker reads EOF and ends.
WORKER = """\
import sys

def wait_for_shard():
    print("ready", flush=True); sys.stdin.readline()

wait_for_shard()
print("released", flush=True)
"""


@pytest.fixture()
def job(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    return d


def start_worker(job: Path, tmp_path: Path, rank: int) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "RANK": str(rank), "LOCAL_RANK": str(rank)}
    nodeagent.arm_stacks(str(job), env)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    p = subprocess.Popen([sys.executable, "-u", str(script)], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def test_a_worker_dumps_its_stacks_on_request_and_runs_on(job, tmp_path):
    p = start_worker(job, tmp_path, 0)
    try:
        out = nodeagent._dump_all([p.pid], str(job / "stacks"))
        how, text = out[p.pid]
        assert how == "faulthandler"
        (main,) = parse(how, text)
        assert [f.func for f in main] == ["<module>", "wait_for_shard"]
        assert main[-1].file.endswith("worker.py") and main[-1].line == 4
        p.stdin.write("go\n")
        p.stdin.close()
        assert p.wait(10) == 0 and p.stdout.read() == "released\n"      # undisturbed
    finally:
        p.kill()
        p.wait()


# Stands in for a dump that a busy machine pauses halfway: the signal stays pending (blocked)
# while the file is written in two parts, 0.3 s apart, as faulthandler's handler holds it.
SLOW_DUMPER = """\
import os, signal, sys, time
sig = signal.SIGRTMIN + %d
signal.signal(sig, lambda *a: None)
signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
where = sys.argv[1]
open(os.path.join(where, "%%d.txt" %% os.getpid()), "w").close()     # as arming does
open(os.path.join(where, "%%d.ready" %% os.getpid()), "w").close()
print("ready", flush=True)
deadline = time.time() + 30
while sig not in signal.sigpending() and time.time() < deadline:
    time.sleep(0.01)
with open(os.path.join(where, "%%d.txt" %% os.getpid()), "a") as f:
    f.write("Current thread 0x1 (most recent call first):\\n"); f.flush()
    time.sleep(0.3)
    f.write('  File "worker.py", line 5 in wait_for_shard\\n'); f.flush()
signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
time.sleep(30)
""" % nodeagent.STACK_SIGNAL_OFFSET


def test_a_dump_paused_halfway_is_read_only_once_the_process_is_done_with_it(job, tmp_path):
    where = job / "stacks"
    where.mkdir()
    script = tmp_path / "slow.py"
    script.write_text(SLOW_DUMPER)
    p = subprocess.Popen([sys.executable, str(script), str(where)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        how, text = nodeagent._dump_all([p.pid], str(where))[p.pid]
        assert (how, text.splitlines()) == ("faulthandler", ["Current thread 0x1 (most recent call first):",
                                                             '  File "worker.py", line 5 in wait_for_shard'])
    finally:
        p.kill()
        p.wait()


def test_a_process_without_the_handler_is_never_signalled(job):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (job / "stacks").mkdir()
        how, text = nodeagent._dump_all([sleeper.pid], str(job / "stacks"))[sleeper.pid]
        assert how == "unavailable" and "without clusterrun's stack handler" in text
        assert sleeper.poll() is None                   # the signal would have ended it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_sitecustomize_of_the_users_still_runs(job, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import builtins; builtins.THEIRS = 'ran'\n")
    env = {"PATH": os.environ["PATH"], "RANK": "0", "LOCAL_RANK": "0", "PYTHONPATH": str(theirs)}
    nodeagent.arm_stacks(str(job), env)
    r = subprocess.run([sys.executable, "-c", "import builtins, os; print(builtins.THEIRS, "
                        "os.path.exists(os.path.join(os.environ['CLUSTERRUN_STACKS'], '%d.ready' % os.getpid())))"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert (r.stdout, r.stderr) == ("ran True\n", "")


FAULTHANDLER = """\
Thread 0x00007f1c2d7fe640 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/usr/lib/python3.11/threading.py", line 995 in _bootstrap

Current thread 0x00007f1c3a9b1740 (most recent call first):
  File "/w/train.py", line 88 in wait_for_shard
  File "/w/train.py", line 120 in <module>
"""

PY_SPY = """\
Process 4242: python -u train.py
Python v3.11.7 (/usr/bin/python3.11)

Thread 4242 (idle): "MainThread"
    wait_for_shard (train.py:88)
    <module> (train.py:120)
Thread 4250 (idle): "Thread-1"
    wait (threading.py:331)
    _bootstrap (threading.py:995)
"""


def test_both_dump_formats_parse_to_the_same_threads_main_first():
    fh = parse("faulthandler", FAULTHANDLER)
    spy = parse("py-spy", PY_SPY)
    assert [[f.func for f in t] for t in fh] == [["<module>", "wait_for_shard"], ["_bootstrap", "wait"]]
    assert [[f.func for f in t] for t in spy] == [[f.func for f in t] for t in fh]
    assert str(fh[0][-1]) == "/w/train.py:88 in wait_for_shard"


def nodes():
    hosts = parse_hosts({"hosts": ["node1:2", "node2:2"]})
    return make_plan(hosts, LaunchOptions("t.py"), run_id="r", master_addr="10.0.0.1", master_port=1,
                     controller_python="python3", local_home="/tmp/crh").nodes


def stack(node, rank, *funcs):
    return RankStacks(node, rank, rank - node.rank_start, "faulthandler",
                      (tuple(Frame("/w/train.py", 10 * i + 1, f) for i, f in enumerate(funcs)),))


def test_ranks_with_the_same_stack_group_together_the_odd_one_first():
    n1, n2 = nodes()
    found = [stack(n1, 0, "<module>", "barrier"), stack(n1, 1, "<module>", "barrier"),
             stack(n2, 2, "<module>", "barrier"), stack(n2, 3, "<module>", "wait_for_shard")]
    groups = group(found)
    assert [g.who() for g in groups] == ["rank 3 (node2)", "ranks 0-2 (node1, node2)"]
    assert diagnosis(groups) == "rank 3 (node2) is in wait_for_shard (train.py:11); ranks 0-2 wait in barrier"
    assert render(groups).splitlines()[:3] == [
        "rank 3 (node2): read by faulthandler",
        "    /w/train.py:1 in <module>",
        "    /w/train.py:11 in wait_for_shard",
    ]


def test_one_group_is_said_as_such():
    n1, _ = nodes()
    groups = group([stack(n1, 0, "<module>", "barrier"), stack(n1, 1, "<module>", "barrier")])
    assert diagnosis(groups) == "every rank is in barrier (train.py:11)"


def test_without_a_majority_every_group_is_named_where_it_is():
    n1, n2 = nodes()
    groups = group([stack(n1, 0, "<module>", "a"), stack(n2, 2, "<module>", "b")])
    assert diagnosis(groups) == "rank 0 (node1) is in a (train.py:11); rank 2 (node2) is in b (train.py:11)"


FORKING = """\
import multiprocessing as mp, sys, time

def load_batches(started):
    started.set()
    time.sleep(30)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    started = ctx.Event()
    child = ctx.Process(target=load_batches, args=(started,), daemon=True)
    child.start()
    started.wait(10)                    # the child is in load_batches (and armed: at fork)
    print("ready", flush=True)
    time.sleep(30)
"""


def test_a_ranks_forked_child_answers_for_itself_under_its_rank(job, tmp_path):
    """--children: a DataLoader-style worker forked by the rank re-arms with a file of its own."""
    marker = f"test-{os.getpid()}-{id(job)}"        # this test's processes only
    env = {"PATH": os.environ["PATH"], "RANK": "0", "LOCAL_RANK": "0", "CLUSTERRUN_JOB": marker}
    signal_later: list[int] = []
    nodeagent.arm_stacks(str(job), env)
    script = tmp_path / "forking.py"
    script.write_text(FORKING)
    p = subprocess.Popen([sys.executable, "-u", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        (rank,) = nodeagent.stacks(str(job), {"marker": marker, "children": True})
        for c in rank["children"]:
            signal_later.append(c["pid"])
        assert (rank["rank"], rank["pid"], rank["how"]) == (0, p.pid, "faulthandler")
        (child,) = rank["children"]
        assert child["how"] == "faulthandler" and child["pid"] != p.pid
        assert [f.func for f in parse(child["how"], child["text"])[0]][-1] == "load_batches"
        assert [f.func for f in parse(rank["how"], rank["text"])[0]] == ["<module>"]
    finally:
        for pid in [p.pid, *signal_later]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        p.wait()


# --- shapes real jobs give: dumps captured from real workers (tests/data/stacks) ----------------
# Taken with nodeagent._dump_all from the scripts of test_stacks_shapes_e2e.py run by hand (4 ranks,
# gloo); paths shortened to /venv, /usr and /w. MAINS: each worker's main thread id, as its .ready
# file said.

DUMPS = Path(__file__).parent / "data" / "stacks"
MAINS = {"shapes": [0x7f952141eb80, 0x7ff755c0ab80, 0x7f3fccbfab80, 0x7f91382b3b80],
         "imports": [0x7f4733fffb80, 0x7f5f0fe4ab80, 0x7f6630c85b80, 0x7fcdb2494b80]}


def captured(job: str, rank: int, how: str = "faulthandler", main: bool = True) -> RankStacks:
    n1, n2 = nodes()
    text = (DUMPS / f"{job}-rank{rank}.txt").read_text()
    return RankStacks(n1 if rank < 2 else n2, rank, rank % 2, how,
                      parse(how, text, MAINS[job][rank] if main else None))


def test_a_progress_bar_thread_neither_splits_its_group_nor_comes_before_the_stuck_rank():
    # Rank 0 has a thread shaped as tqdm's TMonitor, rank 1 one as Rich's refresh thread;
    # ranks 0-2 wait in all_reduce, rank 3 sleeps in wait_for_shard.
    groups = group([captured("shapes", r) for r in range(4)])
    assert [g.who() for g in groups] == ["rank 3 (node2)", "ranks 0-2 (node1, node2)"]
    assert diagnosis(groups) == "rank 3 (node2) is in wait_for_shard (shapes.py:28); ranks 0-2 wait in all_reduce"
    assert render(groups).splitlines() == [
        "rank 3 (node2): read by faulthandler",
        "    /w/shapes.py:39 in <module>",
        "    /w/shapes.py:28 in wait_for_shard",
        "",
        "ranks 0-2 (node1, node2): read by faulthandler",
        "  main thread",
        "    /w/shapes.py:40 in <module>",
        "    .../site-packages/torch/distributed/c10d_logger.py:83 in wrapper",
        "    .../site-packages/torch/distributed/distributed_c10d.py:3252 in all_reduce",
        "  thread 2 of 2 (rank 0 only)",
        "    /usr/lib/python3.11/threading.py:1002 in _bootstrap",
        "    /usr/lib/python3.11/threading.py:1045 in _bootstrap_inner",
        "    /w/shapes.py:12 in run",
        "    /usr/lib/python3.11/threading.py:629 in wait",
        "    /usr/lib/python3.11/threading.py:331 in wait",
        "  thread 2 of 2 (rank 1 only)",
        "    /usr/lib/python3.11/threading.py:1002 in _bootstrap",
        "    /usr/lib/python3.11/threading.py:1045 in _bootstrap_inner",
        "    /w/shapes.py:22 in run",
        "    /usr/lib/python3.11/threading.py:629 in wait",
        "    /usr/lib/python3.11/threading.py:331 in wait",
    ]


def test_other_threads_the_whole_group_shares_are_shown_once_without_naming_ranks():
    n1, _ = nodes()
    text = (DUMPS / "shapes-rank0.txt").read_text()
    both = [RankStacks(n1, r, r, "faulthandler", parse("faulthandler", text, MAINS["shapes"][0])) for r in (0, 1)]
    lines = render(group(both)).splitlines()
    assert lines[0] == "ranks 0-1 (node1): read by faulthandler"
    assert [l for l in lines if l.startswith("  ") and not l.startswith("    ")] == ["  main thread", "  thread 2 of 2"]


def test_the_main_thread_is_told_by_its_id_else_by_not_being_started_by_threading():
    text = (DUMPS / "shapes-rank0.txt").read_text()
    # faulthandler lists the monitor first here, and which thread is "current" is chance.
    assert text.startswith("Thread ") and "\nCurrent thread " in text
    for main in (MAINS["shapes"][0], None):
        assert parse("faulthandler", text, main)[0][-1].func == "all_reduce"
    monitor = int(text.split()[1], 16)
    assert parse("faulthandler", text, monitor)[0][-1].func == "wait"     # the id decides
    spy = PY_SPY.replace('"MainThread"', '"Thread-9"').replace('"Thread-1"', '"MainThread"')
    assert parse("py-spy", spy)[0][-1].func == "wait"                     # py-spy names it


def test_a_second_dump_in_one_file_counts_once():
    text = (DUMPS / "shapes-rank2.txt").read_text()
    assert parse("faulthandler", text + "\n" + text, MAINS["shapes"][2]) == parse("faulthandler", text)


def test_importlib_frames_fold_and_a_dump_faulthandler_cut_says_so():
    # Rank 2 waits in a barrier at the bottom of 60 nested imports: faulthandler wrote its 100
    # innermost frames and "..."; its Python-level handler could not answer (blocked in C).
    cut = captured("imports", 2)
    assert cut.main[0] == CUT and len(cut.main) == 101
    lines = list(show(cut.main))
    assert lines[0] == "... outer frames not shown: faulthandler stops at 100 frames ..."
    assert lines[1] == "... 1 importlib frame ..." and lines[3] == "... 5 importlib frames ..."
    assert lines[-3:] == ["/w/deep/m59.py:7 in <module>",
                          ".../site-packages/torch/distributed/c10d_logger.py:83 in wrapper",
                          ".../site-packages/torch/distributed/distributed_c10d.py:5356 in barrier"]
    # 100 frames: 17 modules, 81 of importlib's (in 17 runs), the collective's 2; and the mark.
    assert not any("<frozen" in l for l in lines) and len(lines) == 1 + 17 + 17 + 2


def test_a_dump_read_in_full_shows_the_script_above_the_import_chain():
    # Rank 1 sleeps at the bottom of the same chain: its Python-level handler wrote every frame.
    full = captured("imports", 1, how=nodeagent.FULL_HOW)
    lines = list(show(full.main))
    assert lines[0] == "/w/imports.py:8 in <module>"
    assert lines[1:] == [l for i in range(60) for l in ("... 5 importlib frames ...", f"/w/deep/m{i}.py:1 in <module>")
                         ][:-1] + ["/w/deep/m59.py:6 in <module>"]
    groups = group([captured("imports", r, how=nodeagent.FULL_HOW if r == 1 else "faulthandler") for r in range(4)])
    assert diagnosis(groups) == ("rank 1 (node1) is in <module> (m59.py:6); rank 2 (node2) is in barrier "
                                 "(distributed_c10d.py:5356); ranks 0, 3 wait in barrier")
    assert render(groups).splitlines()[0] == "rank 1 (node1): read by Python (faulthandler stops at 100 frames)"


def test_a_rank_inside_importlib_is_said_to_be_where_its_module_is():
    n1, _ = nodes()
    main = captured("imports", 1, how=nodeagent.FULL_HOW).main[:-1]     # as if m59 were C code loading
    assert main[-1].file == "<frozen importlib._bootstrap>"
    groups = group([RankStacks(n1, 0, 0, "faulthandler", (main,))])
    assert diagnosis(groups) == "every rank is in <module> (m58.py:1)"


def test_installed_packages_paths_are_shortened_and_others_kept():
    assert short_path("/venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py") == \
        ".../site-packages/torch/distributed/c10d_logger.py"
    assert short_path("/usr/lib/python3/dist-packages/yaml/__init__.py") == ".../dist-packages/yaml/__init__.py"
    assert short_path("/usr/lib/python3.11/threading.py") == "/usr/lib/python3.11/threading.py"
    assert short_path("/home/a/site-packages-notes/train.py") == "/home/a/site-packages-notes/train.py"


# --- the agent's side of a dump past faulthandler's 100 frames, with real processes ------------

DEEP_WORKER = """\
import deep.m0
"""


def deep_worker(job: Path, tmp_path: Path, innermost: str) -> subprocess.Popen:
    """A worker that says "ready" at the bottom of 40 nested imports, then runs `innermost`."""
    pkg = tmp_path / "deep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for i in range(39):
        (pkg / f"m{i}.py").write_text(f"import deep.m{i + 1}\n")
    (pkg / "m39.py").write_text(f"import signal, sys, time\nprint('ready', flush=True)\n{innermost}\n")
    (tmp_path / "worker.py").write_text(DEEP_WORKER)
    env = {"PATH": os.environ["PATH"], "RANK": "0", "LOCAL_RANK": "0"}
    nodeagent.arm_stacks(str(job), env)
    p = subprocess.Popen([sys.executable, "-u", str(tmp_path / "worker.py")], env=env, cwd=tmp_path,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


@pytest.mark.parametrize("innermost, answers", [
    ("sys.stdin.readline()", True),                         # Python runs the handler at once
    ("signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN + %d}); sys.stdin.readline()"
     % nodeagent.FULL_SIGNAL_OFFSET, False),                # as a main thread stuck in C code
    ("signal.signal(signal.SIGRTMIN + %d, signal.SIG_DFL); sys.stdin.readline()"
     % nodeagent.FULL_SIGNAL_OFFSET, False),                # the handler is gone: never signalled
], ids=["answers", "blocked", "no-handler"])
def test_a_cut_dump_is_read_in_full_where_the_worker_can_answer(job, tmp_path, innermost, answers):
    p = deep_worker(job, tmp_path, innermost)
    try:
        how, text = nodeagent._dump_all([p.pid], str(job / "stacks"))[p.pid]
        main = parse(how, text, nodeagent._main_thread(str(job / "stacks"), p.pid))[0]
        if answers:
            assert how == nodeagent.FULL_HOW
            assert str(main[0]).endswith("worker.py:1 in <module>") and main[-1].file.endswith("m39.py")
        else:
            assert how == "faulthandler" and main[0] == CUT and main[-1].file.endswith("m39.py")
        p.stdin.write("go\n")
        p.stdin.close()
        assert p.wait(10) == 0                  # undisturbed: the read returned, the script ended
    finally:
        p.kill()
        p.wait()


def test_without_full_a_cut_dump_is_left_as_faulthandler_wrote_it(job, tmp_path):
    """full=False (for samples taken often): no second signal, no wait."""
    p = deep_worker(job, tmp_path, "sys.stdin.readline()")
    try:
        how, text = nodeagent._dump_all([p.pid], str(job / "stacks"), full=False)[p.pid]
        assert how == "faulthandler" and parse(how, text)[0][0] == CUT
        assert not (job / "stacks" / f"{p.pid}.full.txt").exists()
    finally:
        p.kill()
        p.wait()
