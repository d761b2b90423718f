"""Unit: one run's controller (controller.RunController) over fake transports.

Everything but the connections is real: the plan (make_plan), every node's
RemoteJob and NodeOutput, the preflight Gate, the run directory, the summary and
the exit code. Each node's transport is a tests/fakenode.FakeTransport playing
the node agent. What is asserted is what the user gets: the lines and messages
printed, the exit code, result.json, and the bytes each node agent was sent.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, TypeVar

import pytest

from clusterrun.run.controller import RunController
from clusterrun.errors import EXIT_JOB_FAILED, EXIT_OK, UnreachableError
from clusterrun.hostsfile import parse_hosts
from clusterrun.model import NodeResult, NodeState
from clusterrun.nodeagent import LAUNCHER_KEY, Command, Event, Mode, kill_command
from clusterrun.options import LaunchOptions, WatchOptions
from clusterrun.plan import Plan, make_plan
from clusterrun.run.preflight import Gate, preflight_error
from clusterrun.run.records import NodeRecord
from clusterrun.run.runs import RunDir
from fakenode import FakeProcess, FakeTransport, Screen

KILL_2 = kill_command(2.0).rstrip(b"\n")       # the stop line for a 2 s grace, as the controller sends it

RUN_ID = "20260101-000000-abc123"
LAUNCH = LaunchOptions("train.py")


pytestmark = pytest.mark.usefixtures("fake_sessions")


@pytest.fixture()
def plan(home) -> Plan:
    """nodeW has ranks 0-1, nodeX ranks 2-3, nodeY ranks 4-5."""
    hosts = parse_hosts({"nproc_per_node": 2, "hosts": [
        {"host": "gpu-w", "name": "nodeW"}, {"host": "gpu-x", "name": "nodeX"}, {"host": "gpu-y", "name": "nodeY"}]})
    return make_plan(hosts, LAUNCH, run_id=RUN_ID, master_addr="10.0.0.1", master_port=29500,
                     controller_python="/usr/bin/python3", local_home=str(home))


Agent = Callable[[FakeProcess], None]
T = TypeVar("T")


class Cluster:
    """A run's controller with one fake transport per node, printing to a Screen."""

    def __init__(self, plan: Plan, agents: dict[str, Agent], **opts) -> None:
        self.plan = plan
        self.run = RunDir.create(plan.run_id)
        self.screen = Screen()
        self.transports = {n.name: FakeTransport(n.host.host, agent=agents.get(n.name)) for n in plan.nodes}
        self.ctl = RunController(plan, self.run, list(self.transports.values()), self.screen.term,
                                 WatchOptions(kill_grace=2, **opts))
        for job in self.ctl.jobs:       # never a real connection: a broken fake link is a lost node
            job.reconnect = None

    def wait(self) -> list[NodeResult]:
        return within(self.ctl.wait)

    def session(self, name: str, k: int = 0) -> FakeProcess:
        return self.transports[name].processes[k]

    def commands(self) -> dict[str, list[bytes]]:
        """What each node's first session was sent after its spec."""
        return {name: t.processes[0].commands for name, t in self.transports.items()}

    def result_json(self) -> dict[str, tuple]:
        return {r["node"]: (r["state"], r["code"], r["stopped"]) for r in self.run.read_json("result.json")}


@pytest.fixture()
def fake_run(plan):
    made: list[Cluster] = []

    def make(agents: dict[str, Agent], **opts) -> Cluster:
        made.append(Cluster(plan, agents, **opts))
        return made[-1]

    yield make
    for c in made:
        c.ctl.close()


# --- node agents, as scripts ------------------------------------------------------------


def probe(p: FakeProcess, **override) -> None:
    """Answer the preflight's probe as a ready node would (override: what is wrong)."""
    assert p.spec is not None
    info = {"python": "3.11.7", "executable": "/usr/bin/python3", "hostname": p.transport.name,
            "cwd": "/home/alice/project", "script_found": True, "ifname": "eth0", "torch_found": True}
    if "port" in p.spec["check"]:
        info["port_free"] = True
    info.update(override)
    p.preamble().event(Event.PROBE, **info)


def start(p: FakeProcess, line: bytes) -> None:
    """The job has started and its local rank 0 prints a line."""
    p.event(Event.STARTED, pgid=4242, ifname="eth0", hostname=p.transport.name)
    p.data("0", line)


def dies_when_killed(p: FakeProcess, line: bytes) -> None:
    """On `kill`: kill the job (its last line), report it, then its end."""
    if line.startswith(Command.KILL):
        p.data("0", b"got SIGTERM\n")
        p.event(Event.KILLED, forced=False, left=0)
        p.event(Event.EXIT, code=1, failures=[], stop_time=1767225600.5)    # (when the kill reached it)


def runs_until_killed(p: FakeProcess) -> None:
    p.on_command = dies_when_killed
    p.preamble()
    start(p, b"step 1\n")


def within(call: Callable[[], T], timeout: float = 5.0) -> T:
    """call(), in a thread, bounded: a test whose run does not end fails instead of hanging."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(call()), daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"{getattr(call, '__qualname__', call)} did not return within {timeout}s"
    return out[0]


def wait_until(what: Callable[[], object], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not what():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


# --- a run that works -------------------------------------------------------------------


def test_after_every_probe_passes_every_node_gets_go_and_its_lines_reach_the_terminal(fake_run, plan):
    order: list[str] = []
    lock = threading.Lock()

    def agent(p: FakeProcess) -> None:
        def on_command(p: FakeProcess, line: bytes) -> None:
            if line == Command.GO:
                with lock:
                    order.append("go")
                p.event(Event.STARTED, pgid=4242, ifname="eth0", hostname=p.transport.name)
                p.data("0", b"hello from %s\n" % p.transport.name.encode())
                p.data(LAUNCHER_KEY, b"torchrun done\n")
                p.event(Event.EXIT, code=0, failures=[])

        p.on_command = on_command
        with lock:
            order.append("probe")
        probe(p)

    c = fake_run({"nodeW": agent, "nodeX": agent, "nodeY": agent})
    gate = Gate(plan, LAUNCH, plan.master_port)
    c.ctl.launch(start=True, gate=gate)
    assert within(gate.wait) is True
    results = c.wait()
    code = c.ctl.finish(results)

    assert code == EXIT_OK
    assert order == ["probe"] * 3 + ["go"] * 3, "no node starts before every node has probed"
    assert c.commands() == {"nodeW": [Command.GO, Command.RM], "nodeX": [Command.GO, Command.RM], "nodeY": [Command.GO, Command.RM]}
    checks = [dict(c.session(n.name).spec["check"]) for n in plan.nodes]    # type: ignore[index]
    for n, check in zip(plan.nodes, checks):    # the GPU inventory, with nvidia-smi on the job's PATH
        assert check.pop("inventory") is True and check.pop("env") == dict(n.env)
    assert checks[0] == {"mode": Mode.PROBE, "torch": False, "master_addr": "10.0.0.1", "script": "train.py",
                         "module": False, "port": 29500}, "only node 0 checks the master port"
    assert checks[1] == checks[2] == {"mode": Mode.PROBE, "torch": False, "master_addr": "10.0.0.1",
                                      "script": "train.py", "module": False}
    lines = c.screen.text.splitlines()
    assert sorted(lines) == sorted([b"[nodeW g0 l0] hello from gpu-w", b"[nodeW] torchrun done",
                                    b"[nodeX g2 l0] hello from gpu-x", b"[nodeX] torchrun done",
                                    b"[nodeY g4 l0] hello from gpu-y", b"[nodeY] torchrun done"])
    assert [x for x in lines if x.startswith(b"[nodeX")] == [b"[nodeX g2 l0] hello from gpu-x",
                                                             b"[nodeX] torchrun done"], "in its order"
    assert c.screen.messages == []
    assert c.result_json() == {n: ("exited", 0, False) for n in ("nodeW", "nodeX", "nodeY")}
    assert {s.node: s.state for s in c.run.node_states().values()} == {
        "nodeW": "exited", "nodeX": "exited", "nodeY": "exited"}
    assert c.run.rank_log(2).read_bytes() == b"hello from gpu-x\n"


# --- fail fast --------------------------------------------------------------------------


TRACEBACK = b'Traceback (most recent call last):\n  File "train.py", line 9, in <module>\nValueError: boom\n'


def fail_rank_3(p: FakeProcess) -> None:
    """nodeX's local rank 1 (global rank 3) raises; torchrun stops its rank 2 and exits 1."""
    p.data("1", TRACEBACK)
    p.event(Event.EXIT, code=1, failures=[{"rank": 3, "local_rank": 1, "exitcode": 1},
                                      {"rank": 2, "local_rank": 0, "exitcode": -15}])


def test_fail_fast_stops_the_other_nodes_and_the_summary_names_the_failure_first(fake_run):
    c = fake_run({"nodeW": runs_until_killed, "nodeX": lambda p: start(p.preamble(), b"step 1\n"),
                 "nodeY": runs_until_killed})
    c.ctl.launch(start=True)
    within(c.ctl.wait_started)
    fail_rank_3(c.session("nodeX"))
    results = c.wait()
    code = c.ctl.finish(results)

    assert code == EXIT_JOB_FAILED
    assert results[0].node.name == "nodeX"
    assert {r.node.name: (r.state, r.code, r.stopped) for r in results} == {
        "nodeX": (NodeState.EXITED, 1, False),
        "nodeW": (NodeState.EXITED, 1, True),
        "nodeY": (NodeState.EXITED, 1, True)}
    assert c.result_json() == {"nodeX": ("exited", 1, False), "nodeW": ("exited", 1, True),
                               "nodeY": ("exited", 1, True)}
    assert c.commands() == {"nodeW": [KILL_2, Command.RM], "nodeX": [Command.RM], "nodeY": [KILL_2, Command.RM]}
    assert all(len(t.execs) == 1 for t in c.transports.values()), "the streaming agents killed: no new session"
    m = c.screen.messages
    assert m[:5] == [
        "clusterrun: node nodeX failed: stopping the other nodes",
        "clusterrun: rank 3 (nodeX, local rank 1) exited with code 1",
        "  | Traceback (most recent call last):",
        '  |   File "train.py", line 9, in <module>',
        "  | ValueError: boom",
    ]
    said = [x for x in m[5:] if not x.startswith("  | ")]       # (the last lines shown under each)
    assert said[0] == "clusterrun: rank 2 (nodeX, local rank 0) was stopped (SIGTERM) after rank 3 failed"
    assert sorted(said[1:]) == ["clusterrun: node nodeW (ranks 0-1) was stopped after rank 3 failed",
                                "clusterrun: node nodeY (ranks 4-5) was stopped after rank 3 failed"]
    assert b"[nodeX g3 l1] ValueError: boom\n" in c.screen.text
    assert b"[nodeW g0 l0] got SIGTERM\n" in c.screen.text and b"[nodeY g4 l0] got SIGTERM\n" in c.screen.text


class WatchedQueue(queue.Queue):
    """The controller's queue of node results; `again` is set once wait() comes back for
    the next result, i.e. has fully dealt with the first."""

    def __init__(self) -> None:
        super().__init__()
        self.returned = 0
        self.again = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> NodeResult:
        if self.returned:
            self.again.set()
        r = super().get(block, timeout)
        self.returned += 1
        return r


def test_without_fail_fast_the_other_nodes_run_on_to_their_own_end(fake_run):
    def runs(p: FakeProcess) -> None:
        p.preamble()
        start(p, b"step 1\n")

    c = fake_run({"nodeW": runs, "nodeX": runs, "nodeY": runs}, fail_fast=False)
    c.ctl.done = done = WatchedQueue()
    c.ctl.launch(start=True)
    within(c.ctl.wait_started)
    out: list[list[NodeResult]] = []
    waiter = threading.Thread(target=lambda: out.append(c.ctl.wait()), daemon=True)
    waiter.start()
    fail_rank_3(c.session("nodeX"))
    assert done.again.wait(5)
    for name in ("nodeW", "nodeY"):
        c.session(name).data("0", b"step 2\n").event(Event.EXIT, code=0, failures=[])
    waiter.join(5)
    assert out, "the run did not end"
    (results,) = out
    code = c.ctl.finish(results)

    assert code == EXIT_JOB_FAILED
    assert c.commands() == {"nodeW": [Command.RM], "nodeX": [Command.RM], "nodeY": [Command.RM]}, "nobody was killed"
    assert c.result_json() == {"nodeX": ("exited", 1, False), "nodeW": ("exited", 0, False),
                               "nodeY": ("exited", 0, False)}
    assert "clusterrun: node nodeX failed: stopping the other nodes" not in c.screen.messages
    assert c.screen.messages[0] == "clusterrun: rank 3 (nodeX, local rank 1) exited with code 1"
    assert b"[nodeW g0 l0] step 2\n" in c.screen.text


def test_fail_fast_also_stops_a_node_that_is_reconnecting(fake_run):
    def after_reconnect(p: FakeProcess) -> None:
        assert p.spec is not None
        if p.spec["mode"] == Mode.KILL:            # the kill mode, in a session of its own
            p.preamble().event(Event.KILLED, forced=False, left=0)
            p.exit(0)
        else:                                   # the re-attach: streams on until killed
            p.on_command = dies_when_killed
            p.preamble().data("0", b"step 2\n")

    t2 = FakeTransport("gpu-w", agent=after_reconnect)
    reconnecting, release = threading.Event(), threading.Event()

    def reconnect() -> FakeTransport:
        reconnecting.set()
        release.wait(10)
        return t2

    c = fake_run({"nodeW": lambda p: start(p.preamble(), b"step 1\n"),
                 "nodeX": lambda p: start(p.preamble(), b"step 1\n"), "nodeY": runs_until_killed})
    c.ctl.jobs[0].reconnect = reconnect
    c.ctl.launch(start=True)
    within(c.ctl.wait_started)
    c.session("nodeW").hang_up()                # nodeW's link drops; its job runs on
    assert reconnecting.wait(5)
    out: list[list[NodeResult]] = []
    waiter = threading.Thread(target=lambda: out.append(c.ctl.wait()), daemon=True)
    waiter.start()
    fail_rank_3(c.session("nodeX"))
    wait_until(lambda: c.transports["nodeW"].refused, timeout=2)    # its kill mode could not run
    release.set()

    waiter.join(0.5)
    assert out, "fail fast did not end the run: nodeW's job was never stopped"
    told = [p for p in t2.processes if p.spec and (p.spec["mode"] == Mode.KILL or KILL_2 in p.commands)]
    assert told, "nodeW's job was not told to stop"
    assert {r.node.name: r.stopped for r in out[0]} == {"nodeX": False, "nodeW": True, "nodeY": True}


def test_a_node_unreachable_for_the_reconnect_window_of_the_watch_options_is_lost(fake_run):
    """WatchOptions.reconnect_window (CLUSTERRUN_RECONNECT_WINDOW at the CLI) is each node's
    window: the node is lost after it, and fail fast stops the others."""
    def unreachable() -> FakeTransport:
        raise UnreachableError("gpu-x: connection refused")

    c = fake_run({"nodeW": runs_until_killed, "nodeX": lambda p: start(p.preamble(), b"step 1\n"),
                  "nodeY": runs_until_killed}, reconnect_window=0.2)
    c.ctl.jobs[1].reconnect = unreachable
    c.ctl.launch(start=True)
    within(c.ctl.wait_started)
    c.session("nodeX").hang_up()                # its link drops and never comes back
    results = c.wait()                          # within 5 s: not the default 60 s
    assert {r.node.name: (r.state, r.message, r.stopped) for r in results}["nodeX"] == (
        NodeState.LOST, "unreachable for 0.2s", False)
    assert {r.node.name: r.stopped for r in results if r.node.name != "nodeX"} == {"nodeW": True, "nodeY": True}


def test_fail_fast_also_stops_a_node_whose_session_is_still_opening(fake_run):
    opening, opened = threading.Event(), threading.Event()

    def hold_the_first(command: str) -> None:
        if not opening.is_set():
            opening.set()
            opened.wait(10)

    def agent(p: FakeProcess) -> None:
        assert p.spec is not None
        if p.spec["mode"] == Mode.KILL:            # nothing of the job there yet: nothing to kill
            p.preamble().event(Event.KILLED, forced=False, left=0)
            p.exit(0)
        else:
            runs_until_killed(p)

    c = fake_run({"nodeW": agent, "nodeX": lambda p: start(p.preamble(), b"step 1\n"),
                  "nodeY": runs_until_killed})
    w = c.transports["nodeW"]
    w.before_exec = hold_the_first
    c.ctl.launch(start=True)
    assert opening.wait(5)
    assert wait_until(lambda: c.transports["nodeX"].processes and c.transports["nodeY"].processes)
    out: list[list[NodeResult]] = []
    waiter = threading.Thread(target=lambda: out.append(c.ctl.wait()), daemon=True)
    waiter.start()
    fail_rank_3(c.session("nodeX"))
    wait_until(lambda: w.processes, timeout=2)      # its stop ran the kill mode, before the job
    opened.set()

    waiter.join(0.5)
    assert out, "fail fast did not end the run: nodeW's job was started after its stop and runs on"
    started = [p for p in w.processes if p.spec and p.spec["mode"] == Mode.START]
    assert not started or KILL_2 in started[0].commands, "nodeW's job started and was never stopped"


# --- the preflight gate -----------------------------------------------------------------


def test_a_node_that_fails_its_preflight_holds_back_every_node_and_is_named(fake_run, plan):
    c = fake_run({"nodeW": probe, "nodeY": probe,
                 "nodeX": lambda p: probe(p, script_found=False, cwd="/home/alice/elsewhere")})
    gate = Gate(plan, LAUNCH, plan.master_port)
    c.ctl.launch(start=True, gate=gate)
    assert within(gate.wait) is False
    results = c.wait()

    assert c.commands() == {"nodeW": [Command.STOP], "nodeX": [Command.STOP], "nodeY": [Command.STOP]}, "no go to anyone"
    assert {r.node.name: r.state for r in results} == {n: NodeState.NOT_STARTED for n in ("nodeW", "nodeX", "nodeY")}
    assert str(preflight_error(gate.problems or [])) == (
        "preflight failed, nothing was started:\n"
        "  nodeX: script 'train.py' not found in /home/alice/elsewhere (copy it there, or use --sync)\n"
        "(--skip-check skips these checks)")
    assert c.screen.text == b""
    assert {s.node: s.state for s in c.run.node_states().values()} == {
        "nodeW": "not-started", "nodeX": "not-started", "nodeY": "not-started"}


def test_a_node_whose_agent_cannot_start_holds_back_every_node_and_is_named(fake_run, plan):
    c = fake_run({"nodeW": probe, "nodeX": probe,
                 "nodeY": lambda p: p.exit(127, "sh: 1: exec: /usr/bin/python3: not found\n")})
    gate = Gate(plan, LAUNCH, plan.master_port)
    c.ctl.launch(start=True, gate=gate)
    assert within(gate.wait) is False
    results = c.wait()

    assert c.session("nodeW").commands == [Command.STOP] and c.session("nodeX").commands == [Command.STOP]
    assert {r.node.name: r.state for r in results} == {
        "nodeW": NodeState.NOT_STARTED, "nodeX": NodeState.NOT_STARTED, "nodeY": NodeState.FAILED_TO_START}
    assert gate.problems == ["nodeY: python /usr/bin/python3 not found"]


def test_a_busy_master_port_holds_back_every_node(fake_run, plan):
    c = fake_run({"nodeW": lambda p: probe(p, port_free=False), "nodeX": probe, "nodeY": probe})
    gate = Gate(plan, LAUNCH, plan.master_port)
    c.ctl.launch(start=True, gate=gate)
    assert within(gate.wait) is False
    c.wait()
    assert c.commands() == {"nodeW": [Command.STOP], "nodeX": [Command.STOP], "nodeY": [Command.STOP]}
    assert gate.problems == ["nodeW: master port 29500 is already in use (pick another with --master-port, "
                             "or `auto`)"]


# --- kill, through the run's control socket ---------------------------------------------


def test_kill_through_the_control_socket_has_every_streaming_agent_kill_its_job(fake_run):
    from clusterrun.run.control import request_kill

    c = fake_run({"nodeW": runs_until_killed, "nodeX": runs_until_killed, "nodeY": runs_until_killed})
    c.ctl.launch(start=True)
    within(c.ctl.wait_started)
    c.run.mark_killed("clusterrun kill")            # as `clusterrun kill` does first
    answer: list[list[str] | None] = []
    killer = threading.Thread(target=lambda: answer.append(request_kill(c.run, 2.0)), daemon=True)
    killer.start()
    results = c.wait()
    code = c.ctl.finish(results)
    killer.join(5)

    assert answer == [[]], "kill answers once every node confirmed, with no problem"
    assert code == EXIT_JOB_FAILED
    assert c.commands() == {n: [KILL_2, Command.RM] for n in ("nodeW", "nodeX", "nodeY")}
    assert all(len(t.execs) == 1 for t in c.transports.values())
    assert c.result_json() == {n: ("killed", 1, True) for n in ("nodeW", "nodeX", "nodeY")}
    assert sorted(c.screen.messages) == [
        f"clusterrun: node {n} (ranks {r}) was killed (clusterrun kill)"
        for n, r in (("nodeW", "0-1"), ("nodeX", "2-3"), ("nodeY", "4-5"))]


# --- a collector attaching to a run some of whose nodes have ended ------------------------


def test_a_node_whose_end_is_recorded_is_not_connected_and_keeps_its_recorded_end(plan):
    """connect_live hands the collector None for such a node: its result is its record."""
    run = RunDir.create(plan.run_id)
    run.set_node_state(0, NodeRecord("nodeW", NodeState.EXITED, time=1.0, code=3))
    for k, name in ((1, "nodeX"), (2, "nodeY")):
        run.set_node_state(k, NodeRecord(name, NodeState.RUNNING, time=1.0, pgid=4242))

    def ends(p: FakeProcess) -> None:
        assert p.spec is not None and p.spec["mode"] == Mode.ATTACH
        p.preamble().data("0", b"last line\n").event(Event.EXIT, code=0, failures=[])

    screen = Screen()
    live = [FakeTransport("gpu-x", agent=ends), FakeTransport("gpu-y", agent=ends)]
    ctl = RunController(plan, run, [None, *live], screen.term, WatchOptions(kill_grace=2, report=False))
    try:
        assert [j.node.name for j in ctl.jobs] == ["nodeX", "nodeY"]
        for job in ctl.jobs:
            job.reconnect = None
        ctl.launch(start=False)
        results = within(ctl.wait)
        code = ctl.finish(results)
    finally:
        ctl.close()
    assert code == EXIT_JOB_FAILED
    assert sorted((r.node.name, r.state, r.code) for r in results) == [
        ("nodeW", "exited", 3), ("nodeX", "exited", 0), ("nodeY", "exited", 0)]
    assert {s.node: (s.state, s.code) for s in run.node_states().values()} == {
        "nodeW": ("exited", 3), "nodeX": ("exited", 0), "nodeY": ("exited", 0)}
    assert len(run.read_json("result.json")) == 3, "the run's end is recorded, every node in it"
    assert run.rank_log(2).read_bytes() == b"last line\n"
