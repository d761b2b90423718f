"""Unit: one node's job seen from the controller (remote.RemoteJob) over a fake transport.

The RemoteJob, its NodeOutput, the run directory and the terminal are real; only
the connection is fake (tests/fakenode.py): it plays the node agent's bytes and
records what the controller writes to it.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
import zlib
from pathlib import Path

import pytest

from clusterrun import nodeagent

from clusterrun.run import remote
from clusterrun.errors import UnreachableError
from clusterrun.hostsfile import parse_hosts
from clusterrun.model import NodeState, RankFailure
from clusterrun.options import LaunchOptions
from clusterrun.plan import Plan, make_plan
from clusterrun.nodeagent import LAUNCHER_KEY, Command, Event, Mode, kill_command
from clusterrun.run.agentspec import attach_spec, probe_check, probe_spec
from clusterrun.run.remote import RemoteJob, start_agent
from clusterrun.run.runs import RunDir
from clusterrun.run.stream import NodeOutput
from clusterrun.transports.local import LocalTransport
from fakenode import HEARTBEAT, FakeProcess, FakeTransport, Screen, data_frame, event_frame

KILL_2 = kill_command(2.0).rstrip(b"\n")       # the stop line for a 2 s grace, as the controller sends it

RUN_ID = "20260101-000000-abc123"


pytestmark = pytest.mark.usefixtures("fake_sessions")


@pytest.fixture()
def screen() -> Screen:
    return Screen()


def node_job(plan: Plan, run: RunDir, screen: Screen, transport: FakeTransport, **kw) -> RemoteJob:
    """nodeX's job (node_rank 1, ranks 3-4), printing to the screen."""
    node = plan.nodes[1]
    return RemoteJob(node, transport, NodeOutput(node, run, screen.term), plan.master_addr, **kw)


class Running:
    """RemoteJob.run in a thread of its own, as the controller runs it."""

    def __init__(self, job: RemoteJob, **kw) -> None:
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(job, kw), daemon=True)
        self.thread.start()

    def _run(self, job: RemoteJob, kw: dict) -> None:
        try:
            self.value = job.run(**kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            self.error = e

    def result(self, timeout: float = 5.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "RemoteJob.run did not return"
        if self.error is not None:
            raise self.error
        return self.value


def finished_job(p: FakeProcess) -> None:
    """An agent whose job already ended cleanly: no output, just its exit."""
    p.preamble().event(Event.EXIT, code=0, failures=[])


# --- the fake speaks the agent's protocol ---------------------------------------------------


def test_fake_frames_are_byte_for_byte_the_agents_own(tmp_path, monkeypatch):
    log = tmp_path / "stdout.log"
    log.write_bytes(b"a\nbb\npartial")
    sources = {"3": nodeagent.Source("3", str(log), 0)}
    try:
        frames = b"".join(nodeagent.read_frames(sources))
    finally:
        os.close(sources["3"].fd)
    assert frames == data_frame("3", b"a\nbb\n")

    written: list[bytes] = []
    monkeypatch.setattr(nodeagent, "write_out", written.append)
    nodeagent.event(Event.EXIT, code=1, failures=[{"rank": 4, "local_rank": 1, "exitcode": 1}])
    assert written == [event_frame(Event.EXIT, code=1, failures=[{"rank": 4, "local_rank": 1, "exitcode": 1}])]


def test_fake_agent_output_is_byte_for_byte_a_real_agents(tmp_path):
    """A real agent (over LocalTransport), asked to attach to a job that is not there."""
    hosts = parse_hosts({"hosts": ["localhost"], "python": sys.executable})
    (node,) = make_plan(hosts, LaunchOptions("train.py"), run_id=RUN_ID, master_addr="127.0.0.1",
                        master_port=29500, controller_python=sys.executable,
                        local_home=str(tmp_path)).nodes
    proc, _ = start_agent(node, LocalTransport("localhost"), attach_spec(node, {}, follow=True))
    try:
        real = proc.stdout.read()
        assert proc.wait(timeout=30) == 0, proc.stderr_text()
    finally:
        proc.close()

    fake = FakeTransport("localhost")
    p = fake.exec(remote.agent_command(node, token=proc_token(real), mode=Mode.ATTACH))
    p.preamble().event(Event.LOST, reason="no job directory on the node")
    p.exit(0)
    assert p.stdout.read() == real


def proc_token(agent_output: bytes) -> str:
    first = agent_output.split(b"\n")[1]
    assert first.startswith(nodeagent.AGENT_MARK)
    return first[len(nodeagent.AGENT_MARK):].decode()


# --- frames ---------------------------------------------------------------------------------


def test_worker_and_launcher_lines_reach_the_terminal_tagged_and_the_logs_raw(plan, run, screen):
    def agent(p: FakeProcess) -> None:
        p.preamble()
        p.event(Event.STARTED, pgid=4242, ifname="eth0", hostname="gpu-x")
        p.data(LAUNCHER_KEY, b"W1126 torchrun warning\n")
        p.data("0", b"loss 0.5\nloss 0.4\n")
        p.heartbeat()
        p.data("1", b"rank 4 here\n")
        p.event(Event.EXIT, code=0, failures=[])

    t = FakeTransport("gpu-x", agent=agent)
    started: list[dict] = []
    j = node_job(plan, run, screen, t, on_started=lambda n, ev: started.append(ev))
    result = j.run()

    assert screen.text == (b"[nodeX] W1126 torchrun warning\n"
                           b"[nodeX g3 l0] loss 0.5\n[nodeX g3 l0] loss 0.4\n"
                           b"[nodeX g4 l1] rank 4 here\n")
    assert run.node_log(1).read_bytes() == b"W1126 torchrun warning\n"
    assert run.rank_log(3).read_bytes() == b"loss 0.5\nloss 0.4\n"
    assert run.rank_log(4).read_bytes() == b"rank 4 here\n"
    assert (result.state, result.code, result.stopped) == (NodeState.EXITED, 0, False)
    assert started == [{"pgid": 4242, "ifname": "eth0", "hostname": "gpu-x"}]
    (p,) = t.processes
    assert zlib.decompress(base64.b64decode(p.shipped or b"")) == Path(nodeagent.__file__).read_bytes()
    assert p.spec is not None and p.spec["mode"] == Mode.START
    assert p.spec["argv"] == list(plan.nodes[1].argv) and p.spec["job_dir"] == plan.nodes[1].job_dir
    assert p.commands == [Command.RM], "once every byte is in the logs, the node may clean up"
    assert p.closed


def test_exit_with_failures_is_the_nodes_result(plan, run, screen):
    failures = [{"rank": 4, "local_rank": 1, "exitcode": 7}, {"rank": 3, "local_rank": 0, "exitcode": -15}]
    t = FakeTransport("gpu-x", agent=lambda p: p.preamble().event(Event.EXIT, code=1, failures=failures))
    result = node_job(plan, run, screen, t).run()
    assert (result.state, result.code) == (NodeState.EXITED, 1)
    assert result.failures == [RankFailure(4, 1, 7), RankFailure(3, 0, -15)]


def test_login_output_that_looks_like_frames_is_login_output_not_parsed(plan, run, screen):
    # A frame header, an event and a heartbeat, from .bashrc; then an open line (the agent's newline ends it)
    lookalikes = [nodeagent.data_header("0", 4), event_frame(Event.EXIT, code=9), HEARTBEAT]
    login = b"".join(lookalikes) + b"conda: env activated"
    t = FakeTransport("gpu-x", agent=lambda p: p.preamble(login).data("0", b"real\n")
                      .event(Event.EXIT, code=0, failures=[]))
    result = node_job(plan, run, screen, t).run()

    assert screen.text == (b"".join(b"[nodeX] " + line for line in lookalikes)
                           + b"[nodeX] conda: env activated\n"
                           b"[nodeX g3 l0] real\n")
    assert (result.state, result.code) == (NodeState.EXITED, 0), "the login's fake exit is not the job's"
    assert run.login_log(1).read_bytes() == login + b"\n"
    assert run.rank_log(3).read_bytes() == b"real\n"
    assert not run.node_log(1).exists()


def test_a_line_between_frames_that_is_no_frame_is_shown_apart_and_counts_in_no_offset(plan, run, screen):
    t = FakeTransport("gpu-x", agent=lambda p: p.preamble().data("0", b"a\n").write(b"stray words\n")
                      .data("0", b"b\n").event(Event.EXIT, code=0, failures=[]))
    j = node_job(plan, run, screen, t)
    j.run()
    assert screen.text == b"[nodeX g3 l0] a\n[nodeX] stray words\n[nodeX g3 l0] b\n"
    assert run.rank_log(3).read_bytes() == b"a\nb\n"
    assert run.login_log(1).read_bytes() == b"stray words\n"
    assert j.output.received == {"0": 4}


def test_an_agent_that_cannot_start_fails_to_start_with_its_error(plan, run, screen):
    t = FakeTransport("gpu-x", agent=lambda p: p.exit(127, "sh: 1: exec: /usr/bin/python3: not found\n"))
    reconnects: list[int] = []
    j = node_job(plan, run, screen, t, reconnect=lambda: reconnects.append(1) or t)
    result = j.run()
    assert (result.state, result.code) == (NodeState.FAILED_TO_START, 127)
    assert result.message == "python /usr/bin/python3 not found"
    assert reconnects == [] and len(t.execs) == 1, "a dead agent is not a lost link: no reconnect"


# --- reconnect ------------------------------------------------------------------------------


def test_after_a_broken_stream_the_reattach_sends_each_files_offset_without_login_bytes(plan, run, screen):
    def first(p: FakeProcess) -> None:
        p.preamble(b"Welcome to gpu-x\n")
        p.data(LAUNCHER_KEY, b"launcher up\n")                      # 12 bytes
        p.data("0", b"a\nb\n")                             # 4
        p.data("1", b"x\n")                                # 2
        p.write(nodeagent.data_header("0", 6) + b"c\n")    # the link drops mid-frame: 2 of 6 bytes
        p.hang_up()

    def second(p: FakeProcess) -> None:                    # rank 0's file from byte 4 on
        p.preamble(b"Welcome to gpu-x\n").data("0", b"c\nd\ne\n").event(Event.EXIT, code=0, failures=[])

    t1, t2 = FakeTransport("gpu-x", agent=first), FakeTransport("gpu-x", agent=second)
    j = node_job(plan, run, screen, t1, reconnect=lambda: t2)
    result = j.run()

    (p2,) = t2.processes
    assert p2.spec == {"job_dir": plan.nodes[1].job_dir, "mode": Mode.ATTACH,
                       "offsets": {LAUNCHER_KEY: 12, "0": 4, "1": 2}, "follow": True,
                       "marker": plan.nodes[1].marker}
    assert (result.state, result.code, j.reconnects) == (NodeState.EXITED, 0, 1)
    assert t1.closes == [False] and t1.processes[0].closed
    assert screen.text == (b"[nodeX] Welcome to gpu-x\n[nodeX] launcher up\n"
                           b"[nodeX g3 l0] a\n[nodeX g3 l0] b\n[nodeX g4 l1] x\n"
                           b"[nodeX] Welcome to gpu-x\n"
                           b"[nodeX g3 l0] c\n[nodeX g3 l0] d\n[nodeX g3 l0] e\n")
    assert run.rank_log(3).read_bytes() == b"a\nb\nc\nd\ne\n", "no line lost, none twice, none cut"
    assert run.node_log(1).read_bytes() == b"launcher up\n"
    assert run.login_log(1).read_bytes() == b"Welcome to gpu-x\n" * 2
    assert t1.processes[0].commands == [] and p2.commands == [Command.RM]


def test_an_attach_starts_each_file_at_the_size_of_its_local_log(plan, run, screen):
    run.node_log(1).write_bytes(b"launcher\n")
    run.rank_log(4).write_bytes(b"old line\n")
    t = FakeTransport("gpu-x", agent=lambda p: p.preamble().data("1", b"new line\n").event(Event.RUNNING))
    j = node_job(plan, run, screen, t)
    result = j.run(start=False, follow=False)
    (p,) = t.processes
    assert p.spec is not None
    assert (p.spec["mode"], p.spec["offsets"], p.spec["follow"]) == (Mode.ATTACH, {LAUNCHER_KEY: 9, "1": 9}, False)
    assert result.state == NodeState.RUNNING and p.commands == [], "caught up: the job runs on, no rm"
    assert run.rank_log(4).read_bytes() == b"old line\nnew line\n"
    assert screen.text == b"[nodeX g4 l1] new line\n"


def test_a_silent_link_counts_as_broken_after_the_stall_timeout(plan, run, screen, monkeypatch):
    monkeypatch.setattr(remote, "STALL_TIMEOUT", 0.05)
    t1 = FakeTransport("gpu-x", agent=lambda p: p.preamble().data("0", b"a\n"))   # then nothing
    t2 = FakeTransport("gpu-x", agent=finished_job)
    j = node_job(plan, run, screen, t1, reconnect=lambda: t2)
    result = j.run()
    (p1,) = t1.processes
    assert p1.read_timeouts == [0.05] and p1.closed
    assert (result.state, j.reconnects) == (NodeState.EXITED, 1)
    assert t2.processes[0].spec["offsets"] == {"0": 2}      # type: ignore[index]


def test_a_node_unreachable_past_the_window_is_lost(plan, run, screen):
    t = FakeTransport("gpu-x", agent=lambda p: p.preamble().hang_up())
    tries: list[int] = []

    def reconnect():
        tries.append(1)
        raise UnreachableError("gpu-x: connection refused")

    j = node_job(plan, run, screen, t, reconnect=reconnect, reconnect_window=0.1)
    result = j.run()
    assert result.state == NodeState.LOST and result.message == "unreachable for 0.1s"
    assert tries, "it tried to reconnect before giving up"


# --- stop: the kill handshake with the streaming agent ---------------------------------------


class EnteringLock:
    """A lock that tells (entered) each time a caller is about to take it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered = threading.Semaphore(0)

    def __enter__(self) -> None:
        self.entered.release()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_stop_sends_one_kill_a_concurrent_stop_shares_its_answer_and_the_stream_runs_to_the_end(
        plan, run, screen):
    t = FakeTransport("gpu-x")
    started = threading.Event()
    j = node_job(plan, run, screen, t, on_started=lambda n, ev: started.set())
    job_run = Running(j)
    p = t.next_process()
    p.wait_for_spec()
    p.preamble().event(Event.STARTED, pgid=4242, ifname="eth0", hostname="gpu-x").data("0", b"step 1\n")
    assert started.wait(5)

    j._stop_lock = lock = EnteringLock()     # type: ignore[assignment]
    reports: list[dict] = []
    first = threading.Thread(target=lambda: reports.append(j.stop(grace=2)), daemon=True)
    first.start()
    assert p.wait_for_command(Command.KILL) == KILL_2
    assert lock.entered.acquire(timeout=5)
    second = threading.Thread(target=lambda: reports.append(j.stop(grace=2)), daemon=True)
    second.start()
    assert lock.entered.acquire(timeout=5), "the second stop is waiting for the first"
    p.event(Event.KILLED, forced=False, left=0)
    first.join(5)
    second.join(5)

    assert reports == [{"forced": False, "left": 0, "event": Event.KILLED}] * 2
    assert [c for c in p.commands if c.startswith(Command.KILL)] == [KILL_2], "one kill, not two"
    assert len(t.execs) == 1, "no kill-mode session: the streaming agent did it"
    assert job_run.thread.is_alive(), "the killed report is an answer, not the end of the stream"

    p.data("0", b"terminated\n").event(Event.EXIT, code=1, failures=[{"rank": 3, "local_rank": 0, "exitcode": -15}],
                                       stop_time=1767225600.5)    # when the kill reached the node
    result = job_run.result()
    assert (result.state, result.stopped) == (NodeState.EXITED, True)
    assert screen.text == b"[nodeX g3 l0] step 1\n[nodeX g3 l0] terminated\n"
    assert p.commands == [KILL_2, Command.RM]
    left = []
    while not j._kill_reports.empty():
        left.append(j._kill_reports.get())
    assert [r for r in left if r is not None] == [], "the stop took the report; none is left over"


def streaming_job_with_a_kill_mode(plan, run, screen, forced: bool):
    """nodeX's job, its streaming agent's session open; a later kill-mode session answers `killed`."""
    def kill_mode(p: FakeProcess) -> None:
        assert p.spec is not None
        if p.spec["mode"] == Mode.KILL:
            p.preamble().event(Event.KILLED, forced=forced, left=0)
            p.exit(0)

    t = FakeTransport("gpu-x", agent=kill_mode)
    started = threading.Event()
    j = node_job(plan, run, screen, t, on_started=lambda n, ev: started.set())
    job_run = Running(j)
    p = t.next_process()
    p.wait_for_spec()
    return t, j, job_run, p, started


def test_a_stop_whose_agent_dies_before_answering_falls_back_to_the_kill_mode(plan, run, screen):
    t, j, job_run, p, started = streaming_job_with_a_kill_mode(plan, run, screen, forced=True)
    p.on_command = lambda p, line: p.hang_up() if line.startswith(Command.KILL) else None
    p.preamble().event(Event.STARTED, pgid=4242, ifname="eth0", hostname="gpu-x")
    assert started.wait(5)

    report = j.stop(grace=2)
    assert report == {"forced": True, "left": 0, "event": Event.KILLED}
    assert len(t.processes) == 2
    assert t.processes[1].spec == {"job_dir": plan.nodes[1].job_dir, "mode": Mode.KILL,
                                   "marker": plan.nodes[1].marker, "grace": 2}
    assert job_run.result().state == NodeState.LOST


def test_a_kill_that_cannot_be_written_falls_back_at_once(plan, run, screen):
    t, j, job_run, p, started = streaming_job_with_a_kill_mode(plan, run, screen, forced=False)
    p.preamble().event(Event.STARTED, pgid=4242, ifname="eth0", hostname="gpu-x")
    assert started.wait(5)
    p.accepts_stdin = False                     # the channel will not take the kill
    waited: list[dict] = []
    j._kill_reports.get = lambda **kw: waited.append(kw)    # type: ignore[method-assign]

    assert j.stop(grace=5) == {"forced": False, "left": 0, "event": Event.KILLED}
    assert waited == [], "no wait for an answer that cannot come"
    assert [q.spec["mode"] for q in t.processes] == [Mode.START, Mode.KILL]     # type: ignore[index]
    p.hang_up()
    assert job_run.result().state == NodeState.LOST


# --- why the login line ended before the agent spoke (real shell, LocalTransport) ------------


# a login shell of each kind (scripts/setup --test installs zsh, tcsh and fish)
@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/dash", "/usr/bin/zsh", "/usr/bin/tcsh", "/usr/bin/fish"])
@pytest.mark.parametrize("entry, cause", [
    ({"workdir": "/nonexistent/clusterrun-wd"}, "workdir /nonexistent/clusterrun-wd: No such file or directory"),
    ({"workdir": "/etc/hostname"}, "workdir /etc/hostname: Not a directory"),
    ({"setup": ["echo getting ready", "ls /nonexistent/clusterrun-x"]},
     "setup failed with exit code 2: ls: cannot access '/nonexistent/clusterrun-x': No such file or directory"),
    ({"setup": "echo only this\nfalse"}, "setup failed with exit code 1: only this"),
    ({"python": "/nonexistent/bin/python3"}, "python /nonexistent/bin/python3 not found"),
    ({"python": "/tmp/clusterrun-not-executable"},
     "python /tmp/clusterrun-not-executable cannot be run (Permission denied)"),
    ({"python": "/tmp/clusterrun-not-executable", "setup": "true"},
     "python /tmp/clusterrun-not-executable cannot be run (Permission denied)"),
])
def test_each_login_failure_is_told_in_its_own_words(entry, cause, shell, tmp_path, monkeypatch):
    from clusterrun.options import LaunchOptions
    from clusterrun.plan import make_plan
    from clusterrun.transports.local import LocalTransport

    monkeypatch.setenv("SHELL", shell)
    Path("/tmp/clusterrun-not-executable").write_text("")
    os.chmod("/tmp/clusterrun-not-executable", 0o644)         # not a program
    hosts = parse_hosts({"hosts": [{"host": "localhost", **entry}]})
    (node,) = make_plan(hosts, LaunchOptions("t.py"), run_id="r1", master_addr="127.0.0.1", master_port=1,
                        controller_python=sys.executable, local_home=str(tmp_path)).nodes
    with pytest.raises(remote.AgentError) as e:
        remote.run_agent(node, LocalTransport("localhost"), probe_spec(node, probe_check(torch=False)))
    assert str(e.value) == cause          # the same words whatever the login shell
