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
from clusterrun.run.stacks import Frame, RankStacks, diagnosis, group, parse, render

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
