"""Unit: the hang watch's decision (hangwatch.py) from samples, and what the node reads for it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clusterrun import nodeagent
from clusterrun.hostsfile import parse_hosts
from clusterrun.options import LaunchOptions
from clusterrun.plan import make_plan
from clusterrun.run import hangwatch
from clusterrun.run.hangwatch import HangWatch, Sample, State, decide, judge
from clusterrun.run.stacks import Frame, RankStacks, Usage

DIST = "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py"


def nodes():
    hosts = parse_hosts({"hosts": ["node1:2", "node2:2"]})
    return make_plan(hosts, LaunchOptions("t.py"), run_id="r", master_addr="10.0.0.1", master_port=1,
                     controller_python="python3", local_home="/tmp/crh").nodes


N1, N2 = nodes()

# main threads, outermost frame first
SLEEPING = (Frame("/w/train.py", 7, "<module>"),)
COMPUTING = (Frame("/w/train.py", 20, "<module>"), Frame("/w/train.py", 12, "step"))
ALL_REDUCE = (Frame("/w/train.py", 9, "<module>"), Frame(DIST, 3252, "all_reduce"))
BARRIER = (Frame("/w/train.py", 30, "<module>"), Frame(DIST, 5356, "barrier"))
BAR_THREAD = (Frame("/usr/lib/python3.11/threading.py", 995, "_bootstrap"),
              Frame("/usr/lib/python3.11/threading.py", 331, "wait"))


def rank(r: int, main, cpu: float = 0.0, main_cpu: float = 0.0, io: int = 0, pid: int = 0,
         dump_cost: float = 0.01, bar: bool = False) -> RankStacks:
    """A rank as one sample reads it: what it had used when asked, and once it answered
    (its own dump costs its main thread `dump_cost` s and a write)."""
    node = N1 if r < 2 else N2
    used = Usage(pid or 100 + r, (cpu, main_cpu, io), (cpu + dump_cost, main_cpu + dump_cost, io + 500))
    threads = (main, BAR_THREAD) if bar else (main,)
    return RankStacks(node, r, r - node.rank_start, "faulthandler", threads, usage=used)


def sample(when: float, *ranks: RankStacks) -> Sample:
    return Sample(when, {rs.rank: rs for rs in ranks}, [])


def later(rs: RankStacks, dt_cpu: float = 0.0, dt_main: float = 0.0, dt_io: int = 0, main=None) -> RankStacks:
    """The same rank at the next sample: its usage moved on from its last answer by this much."""
    u = rs.usage
    assert u is not None
    start = u.after
    before = (start[0] + dt_cpu, start[1] + dt_main, start[2] + dt_io)
    after = (before[0] + 0.01, before[1] + 0.01, before[2] + 500)
    threads = rs.threads if main is None else (main,) + rs.threads[1:]
    return RankStacks(rs.node, rs.rank, rs.local_rank, rs.how, threads, usage=Usage(u.pid, before, after))


def test_a_main_thread_computing_in_one_place_is_working_by_its_cpu_time():
    a = rank(0, COMPUTING)
    seen = judge(a, later(a, dt_cpu=1.2, dt_main=1.2), window=1.25)
    assert seen is not None and (seen.state, seen.why) == (State.WORKING, "CPU time")


def test_a_sleeping_main_thread_is_idle_and_its_own_stack_dumps_do_not_count_as_work():
    a = rank(3, SLEEPING, dump_cost=0.2)        # a costly dump, and a write, at every sample
    seen = judge(a, later(a), window=1.25)
    assert seen is not None and seen.state is State.IDLE and seen.place == "<module> (train.py:7)"


def test_a_main_thread_that_moved_or_did_io_is_working():
    a = rank(0, SLEEPING)
    assert judge(a, later(a, main=COMPUTING), 1.25).why == "main thread moved"
    assert judge(a, later(a, dt_io=4096), 1.25).why == "I/O"
    assert judge(a, RankStacks(a.node, 0, 0, "faulthandler", a.threads,
                               usage=Usage(999, (0, 0, 0), (0, 0, 0))), 1.25).why == "a new process"


def test_in_a_collective_only_the_other_threads_cpu_counts():
    a = rank(1, ALL_REDUCE)
    spinning = judge(a, later(a, dt_cpu=1.2, dt_main=1.2), 1.25)     # a main thread busy-waiting
    assert spinning.state is State.WAITING and spinning.place == "all_reduce"
    moving_data = judge(a, later(a, dt_cpu=0.8, dt_main=0.05), 1.25)  # gloo's threads at work
    assert moving_data.state is State.WORKING


def test_a_progress_bars_refresh_thread_is_not_work():
    """Rich's refresh thread wakes ten times a second: a few ms of CPU time."""
    waiting = rank(0, ALL_REDUCE, bar=True)
    assert judge(waiting, later(waiting, dt_cpu=0.006), 1.25).state is State.WAITING
    sleeping = rank(0, SLEEPING, bar=True)
    assert judge(sleeping, later(sleeping, dt_cpu=0.006), 1.25).state is State.IDLE


def test_a_rank_not_read_twice_is_left_out():
    a = rank(0, SLEEPING)
    assert judge(None, a, 1.0) is None and judge(a, None, 1.0) is None
    assert judge(a, RankStacks(a.node, 0, 0, "unavailable", (), "gone"), 1.0) is None


def stuck_job(t0: float = 0.0) -> tuple[Sample, Sample]:
    first = [rank(0, ALL_REDUCE, bar=True), rank(1, ALL_REDUCE), rank(2, ALL_REDUCE), rank(3, SLEEPING)]
    return sample(t0, *first), sample(t0 + 1.25, *[later(r, dt_cpu=0.004) for r in first])


def test_one_rank_idle_while_the_others_wait_in_a_collective_is_a_hang_and_says_what_was_seen():
    before, after = stuck_job()
    v = decide(before, after, started={0, 1, 2, 3}, startup_over=False)
    assert v.kind == "hung"
    assert hangwatch.evidence(v) == (
        "over 1.2s between two samples no rank worked (no main thread moved or did I/O): "
        "rank 3 stayed in <module> (train.py:7) with no CPU time, outside any collective; "
        "ranks 0-2 stayed in all_reduce")


def test_every_rank_in_the_same_collective_with_nothing_moving_is_a_hang():
    first = [rank(r, BARRIER) for r in range(4)]
    v = decide(sample(0, *first), sample(2, *[later(r) for r in first]), {0, 1, 2, 3}, False)
    assert v.kind == "hung" and hangwatch.evidence(v).endswith(": ranks 0-3 stayed in barrier")


def test_one_rank_working_means_the_job_is_not_hung_and_says_who_and_how():
    first = [rank(0, COMPUTING, bar=True), rank(1, ALL_REDUCE), rank(2, ALL_REDUCE), rank(3, ALL_REDUCE)]
    after = [later(first[0], dt_cpu=1.1, dt_main=1.1)] + [later(r) for r in first[1:]]
    v = decide(sample(0, *first), sample(1.25, *after), {0, 1, 2, 3}, False)
    assert v.kind == "working"
    assert hangwatch.working(v) == "rank 0 (node1) is working (CPU time moving, up to 1.1s in 1.2s)"


def test_a_rank_with_no_line_and_no_collective_yet_is_starting_until_the_start_up_limit():
    first = [rank(r, SLEEPING) for r in range(4)]         # all still asleep in a slow import
    before, after = sample(0, *first), sample(1.25, *[later(r) for r in first])
    assert decide(before, after, started=set(), startup_over=False).kind == "starting"
    assert decide(before, after, started=set(), startup_over=False).starting == (0, 1, 2, 3)
    over = decide(before, after, started=set(), startup_over=True)
    assert (over.kind, over.starting) == ("hung", (0, 1, 2, 3))
    # started ranks (a line, or seen in a collective) are judged at once; one that is not holds it
    assert decide(before, after, started={0, 1, 2}, startup_over=False).starting == (3,)


def test_nothing_read_twice_is_no_verdict():
    a = rank(0, SLEEPING)
    assert decide(sample(0), sample(1, a), {0}, True).kind == "unread"


# --- the watch's loop, with stand-ins for the stream and the nodes -------------------------

class FakeOutput:
    def __init__(self, node, run) -> None:
        self.node, self.run = node, run
        self.line_at: dict[str, float] = {}
        self.received: dict[str, int] = {}


class Job:
    """Four ranks whose samples follow a script: each take() moves every rank on as told."""

    def __init__(self, tmp_path: Path, mains, dt_cpu) -> None:
        run = type("Run", (), {"rank_log": lambda self, r: tmp_path / f"rank{r}.log"})()
        self.outputs = [FakeOutput(N1, run), FakeOutput(N2, run)]
        self.ranks = [rank(r, m) for r, m in enumerate(mains)]
        self.dt_cpu = dt_cpu
        self.said: list[str] = []
        self.hangs: list[str] = []
        self.takes = 0

    def take(self):
        self.takes += 1
        self.ranks = [later(r, dt_cpu=d, dt_main=d) for r, d in zip(self.ranks, self.dt_cpu)]
        return list(self.ranks), []

    def print_all(self, text: str) -> None:
        for o in self.outputs:
            for local in range(2):
                o.line_at[str(local)] = time.monotonic()

    def watch(self, timeout: float, seconds: float) -> HangWatch:
        w = HangWatch(timeout, self.outputs, self.take, self.said.append, lambda why, s: self.hangs.append(why))
        done = threading.Event()
        t = threading.Thread(target=w.run, args=(done.wait, lambda: True), daemon=True)
        t.start()
        time.sleep(seconds)
        done.set()
        t.join(5)
        return w


def test_the_watch_calls_a_silent_stuck_job_hung_once_and_a_computing_one_never(tmp_path):
    stuck = Job(tmp_path, [ALL_REDUCE, ALL_REDUCE, ALL_REDUCE, SLEEPING], [0, 0, 0, 0])
    stuck.print_all("ready")
    stuck.watch(timeout=0.4, seconds=1.5)
    assert len(stuck.hangs) == 1 and stuck.hangs[0].startswith("no output for "), stuck.hangs
    assert "rank 3 stayed in <module> (train.py:7)" in stuck.hangs[0]

    busy = Job(tmp_path, [COMPUTING] * 4, [0.5] * 4)
    busy.print_all("ready")
    busy.watch(timeout=0.4, seconds=1.5)
    assert busy.hangs == [] and busy.takes >= 3
    assert sum("but the job is not hung: ranks 0-3 (node1, node2) are working" in s for s in busy.said) == 1


def test_the_watch_waits_out_the_start_up_limit_for_ranks_that_never_printed(tmp_path):
    job = Job(tmp_path, [SLEEPING] * 4, [0] * 4)         # no line ever: a slow import
    job.watch(timeout=0.2, seconds=1.0)                  # the start-up limit: 2 s
    assert job.hangs == [] and job.takes >= 3
    (said,) = job.said
    assert said.endswith("ranks 0-3 still starting (no line and no collective yet); a hang is called "
                         "only after the start-up limit, 2s (10x --hang-timeout)")
    job.watch(timeout=0.1, seconds=1.4)                  # a new watch; its limit, 1 s, passes
    (hang,) = job.hangs
    assert "ranks 0-3 still starting after the start-up limit, 1s (10x --hang-timeout): " in hang


# --- what the node reads ----------------------------------------------------------------------

BUSY_AND_IDLE = """\
import sys, time
if sys.argv[1] == "busy":
    end = time.monotonic() + 30
    print("ready", flush=True)
    while time.monotonic() < end: pass
else:
    print("ready", flush=True)
    time.sleep(30)
"""


@pytest.mark.parametrize("kind", ["busy", "idle"])
def test_the_agent_reads_each_ranks_cpu_time_before_asking_and_after_the_answer(tmp_path, kind):
    job = tmp_path / "job"
    job.mkdir()
    marker = f"test-{os.getpid()}-{kind}"
    env = {"PATH": os.environ["PATH"], "RANK": "0", "LOCAL_RANK": "0", "CLUSTERRUN_JOB": marker}
    nodeagent.arm_stacks(str(job), env)
    script = tmp_path / "w.py"
    script.write_text(BUSY_AND_IDLE)
    p = subprocess.Popen([sys.executable, "-u", str(script), kind], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        (first,) = nodeagent.stacks(str(job), {"marker": marker})
        time.sleep(0.5)
        (second,) = nodeagent.stacks(str(job), {"marker": marker})
        from clusterrun.run.stacks import from_agent
        a, b = from_agent(N1, {"ranks": [first]})[0], from_agent(N1, {"ranks": [second]})[0]
        assert a.usage is not None and a.usage.pid == p.pid
        seen = judge(a, b, window=0.5)
        assert seen is not None and seen.state is (State.WORKING if kind == "busy" else State.IDLE), seen
    finally:
        p.kill()
        p.wait()


# Python's finalization, after the script's atexit handlers: a global's __del__ runs late
# (torch's own teardown can take seconds here). faulthandler lets go of the signal at the
# end of it; the watch must not ask then, and a signal that comes anyway must not kill.
TEARDOWN = """\
import sys, time

class Late:
    def __del__(self):
        print("tearing down", flush=True)
        sys.stdin.readline()

late = Late()
print("ready", flush=True)
"""


def test_a_worker_shutting_down_is_not_asked_for_its_stacks_and_ignores_the_signal(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    env = {"PATH": os.environ["PATH"], "RANK": "0", "LOCAL_RANK": "0"}
    nodeagent.arm_stacks(str(job), env)
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    p = subprocess.Popen([sys.executable, "-u", str(script)], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        assert p.stdout.readline() == "tearing down\n"
        how, text = nodeagent._dump_all([p.pid], str(job / "stacks"))[p.pid]
        assert (how, text) == ("unavailable", "its script has ended: Python is shutting down\n")
        os.kill(p.pid, nodeagent.signal.SIGRTMIN + nodeagent.STACK_SIGNAL_OFFSET)
        p.stdin.write("go\n")
        p.stdin.close()
        assert p.wait(10) == 0
    finally:
        p.kill()
        p.wait()
