"""Remote job: one node's part of a run, driven over its transport.

The node runs clusterrun/nodeagent.py (shipped inline as `python -c`), which
starts torchrun in its own session and streams its files back in frames; this
module renders that command from the plan and reads the frames.
"""

from __future__ import annotations

import base64
import json
import queue
import secrets
import shlex
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UnreachableError
from ..login import Login
from ..nodeagent import Command, Event, KillSpec, Mode, Spec, kill_command
from ..plan import NodePlan, quote_path
from ..model import NodeResult, NodeState, RankFailure
from ..options import RECONNECT_WINDOW
from ..parallel import each
from .agentspec import attach_spec, kill_spec, start_spec
from ..slurm import node_gone
from .frames import Broken, DataFrame, Frame, FrameReader, Heartbeat, Stray, agent_mark, read_preamble
from .stream import NodeOutput
from ..transports.base import Process, Transport, link_errors

# No byte from a streaming node agent for this long (it sends a heartbeat every
# 5 s) means the link is dead, even if TCP has not noticed yet.
STALL_TIMEOUT = 30.0

# A Slurm node's step that fell silent for STALL_TIMEOUT: slurmctld is asked whether
# the node is gone, then every SLURM_RECHECK seconds while the silence lasts.
SLURM_RECHECK = 5.0


class StepSilent:
    """(Slurm) No byte from the node's step for a read timeout."""


STEP_SILENT = StepSilent()


_AGENT_LINE = base64.b64encode(zlib.compress((Path(__file__).parent.parent / "nodeagent.py").read_bytes(), 9)) + b"\n"
# What runs on the node: a short loader; the agent's code and spec follow on stdin.
AGENT_LOADER = "import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.stdin.buffer.readline())))"


# Modes that only look at or end what a job left on the node (its directory, its
# processes) need neither the workdir nor `setup:`: without them a reconnect, `status`,
# `logs` and `kill` neither wait for a slow setup nor run it again. Unless the python
# is only found through them (a bare name, or a path relative to the workdir).
_NO_LOGIN_MODES = (Mode.ATTACH, Mode.KILL)


def agent_command(node: NodePlan, token: str = "", mode: str = Mode.START, make_workdir: bool = False,
                  setup: bool = True) -> str:
    """The login line that runs the node agent in this mode: cd, setup (its processes
    tagged with the token: see end_setup), then exec python (the loader, with the token).
    setup=False: without the setup (ending one that hangs must not wait for another)."""
    login = Login(node.workdir, node.setup if setup else ())
    if mode in _NO_LOGIN_MODES and node.python.startswith(("/", "~")):
        login = Login(None, ())
    return login.line(f"{quote_path(node.python)} -c {shlex.quote(AGENT_LOADER)} {token}", make_workdir,
                      tag=token)


def login_failure(node: NodePlan, code: int | None, stderr: str, login: bytes = b"") -> str:
    """Why the agent's login line ended before the agent spoke, in words: the workdir, the
    setup (with its exit status and last lines), or the python."""
    return Login(node.workdir, node.setup).why_failed(node.python, code, stderr, login)


@dataclass
class Session:
    """One agent session while it starts: its login's tag (see end_setup) and whether
    the agent has spoken yet (before that the node is logging in or in its setup)."""

    node: NodePlan
    transport: Transport
    tag: str = field(default_factory=lambda: secrets.token_hex(8))
    proc: Process | None = None
    spoke: bool = False

    def end(self) -> str:
        """Give up on this session: end the setup it may still run, then the session.
        Returns what it was doing: "logging in", "in setup" or "being checked"."""
        doing = "being checked" if self.spoke else "logging in"
        if not self.spoke and self.node.setup:
            try:
                if end_setup(self.node, self.transport, self.tag):
                    doing = "in setup"
            except Exception:   # noqa: BLE001 - AgentError or a broken link: the session's end is what is left
                pass
        if self.proc is not None:
            self.proc.close()
        return doing


def start_agent(node: NodePlan, transport: Transport, spec: Spec,
                make_workdir: bool = False, session: Session | None = None) -> tuple[Process, bytes]:
    """Run the node agent in one mode; its stdin is then the mode's to use.

    Returns the process and the line the agent starts its output with: what
    comes before that line is the login's (a .bashrc banner, conda, setup), never
    a frame (see frames.read_preamble). session: filled in with the process."""
    session = session or Session(node, transport)
    setup = not (spec["mode"] == Mode.KILL and spec.get("setup"))
    proc = transport.exec(agent_command(node, session.tag, spec["mode"], make_workdir, setup))
    session.proc = proc
    proc.send(_AGENT_LINE + json.dumps(spec).encode() + b"\n")
    return proc, agent_mark(session.tag)


def end_setup(node: NodePlan, transport: Transport, tag: str, grace: float = 2.0) -> int:
    """End the `setup:` of the login tagged `tag` if it still runs (a session of its own,
    with no setup); returns how many of its processes there were."""
    spec = KillSpec(mode=Mode.KILL, job_dir=node.job_dir, marker=tag, grace=grace, setup=True)
    return int(run_agent(node, transport, spec).get("found", 0))


class Detached(Exception):
    """The controller let go of this node on purpose (`up --detach` handing over)."""


class RemoteJob:
    """One node's job: start it or attach to it, and stream it until it ends.

    A dropped connection is not the end: the job runs on in its own session on
    the node, so we reconnect with backoff and resume each file at the byte
    offset we have, losing and repeating no line.
    """

    def __init__(self, node: NodePlan, transport: Transport, output: NodeOutput, master_addr: str,
                 on_started: Callable[[NodePlan, dict], None] = lambda n, ev: None,
                 reconnect: Callable[[], Transport] | None = None,
                 reconnect_window: float = RECONNECT_WINDOW) -> None:
        self.node = node
        self.transport = transport
        self.output = output
        self.master_addr = master_addr
        self.on_started = on_started
        self.reconnect = reconnect
        self.reconnect_window = reconnect_window
        self.stopped = False
        self.detached = False
        self.reconnects = 0
        self.started = False            # the agent said its job started
        self.attaching = False          # this run() follows a job started earlier (a collector's)
        self.gate: Any = None           # preflight.Gate: probe, then start only if all nodes can
        self._agent: Process | None = None      # the streaming agent, while there is one
        self.session: Session | None = None     # the latest agent session (what it waits for)
        self._kill_reports: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stop_lock = threading.Lock()
        self._stop_report: tuple[float, dict[str, Any]] | None = None   # (when, report)
        # A stop that no streaming agent has received (there was none: the session was
        # still opening, or the link was down): the next agent this job runs kills at once.
        self._undelivered_stop: float | None = None
        self._awaiting_report = False
        self._abandoned = False

    def run(self, start: bool = True, follow: bool = True) -> NodeResult:
        """Stream until the job ends (or, follow=False, until caught up: state running)."""
        spec: Spec = (start_spec(self.node, self.master_addr, None if self.gate is None else self.gate.spec(self.node))
                      if start else self._attach_spec(follow))
        self.attaching = not start
        lost_since: float | None = None
        delay = 0.25
        while True:
            try:
                self.session = Session(self.node, self.transport)
                proc, mark = start_agent(self.node, self.transport, spec, session=self.session)
                self._agent = proc
                if self._abandoned:
                    proc.close()
                try:
                    result = self._read(proc, mark, starting=spec["mode"] == Mode.START)
                finally:
                    self._agent = None
                    if self._awaiting_report:   # a stop() waiting for this agent: it will not answer
                        self._kill_reports.put(None)
                    proc.close()
                if result is not None:
                    if result.state != NodeState.EXITED:    # else the node says whether the stop came first
                        result.stopped = self.stopped
                    return result
            except Detached:
                raise
            except link_errors():
                if self.detached:
                    raise Detached() from None
            # The connection dropped mid-stream: the job goes on; reconnect and resume.
            if self.reconnect is None:
                return NodeResult(self.node, NodeState.LOST, message="the connection to the node was lost")
            now = time.monotonic()
            if lost_since is None:
                self._say(f"lost the connection to {self.node.name}; reconnecting "
                          f"(for up to {self.reconnect_window:g}s, the job goes on there)")
            lost_since = lost_since or now
            if now - lost_since > self.reconnect_window:
                return NodeResult(self.node, NodeState.LOST, stopped=self.stopped,
                                  message=f"unreachable for {self.reconnect_window:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                self.transport.close()
                self.transport = self.reconnect()
            except UnreachableError:
                continue
            self.reconnects += 1
            self._say(f"reconnected to {self.node.name}: its lines resume where they stopped")
            lost_since, delay = None, 0.25
            spec = self._attach_spec(follow)

    def _attach_spec(self, follow: bool) -> Spec:
        """Resume the stream where this controller's copy of each file ends."""
        return attach_spec(self.node, self.output.received, follow)

    def _read(self, proc: Process, mark: bytes, starting: bool) -> NodeResult | None:
        """Frames until the agent's final event; None if the connection broke."""
        spoke, login = read_preamble(proc, mark)   # setup may take a while: up's start limit (Gate)
        if self.session is not None:
            self.session.spoke = spoke
        if not spoke:
            return self._broken(proc, login)
        if not starting:                    # an attach streams at once: it can take a stop now
            self._pass_stop_on(proc)
        if login:                       # kept apart from torchrun's lines: it shifts no offset
            self.output.login(login if login.endswith(b"\n") else login + b"\n")
        data = self.output.data
        frames = FrameReader(proc)
        frame: Frame | StepSilent = frames.next()
        # The agent says something at least every HEARTBEAT_EVERY seconds; silence far
        # longer than that is a dead link (raises socket.timeout: reconnect), or on
        # Slurm a step that fell silent (_next_frame: is the node gone?).
        proc.set_read_timeout(STALL_TIMEOUT)
        silent = False              # (Slurm) the step fell silent: Slurm is asked every SLURM_RECHECK s
        quiet = 0.0
        while True:
            if isinstance(frame, StepSilent):
                quiet = quiet + SLURM_RECHECK if silent else STALL_TIMEOUT
                gone = self._silent_step(quiet)
                if gone is not None:
                    return gone
                if not silent:
                    silent = True
                    proc.set_read_timeout(SLURM_RECHECK)
                frame = self._next_frame(frames)
                continue
            if silent:
                silent = False
                proc.set_read_timeout(STALL_TIMEOUT)
            if isinstance(frame, DataFrame):
                data(frame.key, frame.chunk)
            elif isinstance(frame, Heartbeat):  # the link is alive
                pass
            elif isinstance(frame, Stray):      # not the agent's: show it apart
                line = frame.line
                self.output.login(line if line.endswith(b"\n") else line + b"\n")
            elif isinstance(frame, Broken):
                return self._broken(proc)
            else:
                name, ev = frame.name, frame.fields
                if name == Event.PROBE:
                    go = self.gate.answer(self.node, ev) and not self.stopped
                    if not proc.send((Command.GO if go else Command.STOP) + b"\n") and go:
                        return self._broken(proc)   # the answer did not get there: as a dropped link
                    if not go:
                        self._stop_never_started()
                        return NodeResult(self.node, NodeState.NOT_STARTED)
                elif name == Event.STARTED:
                    self.started = True
                    self.on_started(self.node, ev)
                    self._pass_stop_on(proc)
                elif name == Event.KILLED:      # the answer to stop(): the stream goes on to the end
                    self._kill_reports.put(ev)
                elif name == Event.RUNNING:     # attach without follow: caught up
                    return NodeResult(self.node, NodeState.RUNNING)
                else:
                    return self._final(proc, name, ev)
            frame = self._next_frame(frames)

    def _next_frame(self, frames: FrameReader) -> Frame | StepSilent:
        """The next frame. On Slurm a stream that stalls is no dropped link (there is
        none to drop): the step fell silent, and Slurm is asked whether the node is gone."""
        try:
            return frames.next()
        except socket.timeout:
            if not self.node.host.slurm_job:
                raise
            return STEP_SILENT

    def _silent_step(self, quiet: float) -> NodeResult | None:
        """A Slurm node whose step sent nothing for `quiet` seconds: lost if slurmctld
        says the node is not responding or down; else None (it is slow: wait on)."""
        gone = node_gone(self.node.host.host)
        if gone is None:
            return None
        return NodeResult(self.node, NodeState.LOST, stopped=self.stopped,
                          message=f"its srun step fell silent (nothing for {quiet:.0f}s) and {gone}")

    def _pass_stop_on(self, proc: Process) -> None:
        """A stop that reached no agent: this one kills the job as soon as it streams."""
        grace = self._undelivered_stop
        if grace is not None and proc.send(kill_command(grace)):
            self._undelivered_stop = None

    def _stop_never_started(self) -> None:
        """Held back before it started (the preflight, or a stop): a waiting stop is done."""
        self._undelivered_stop = None
        if self._awaiting_report:
            self._kill_reports.put({"event": Event.KILLED, "forced": False, "left": 0})

    def _final(self, proc: Process, name: str, ev: dict[str, Any]) -> NodeResult:
        # Every byte is in our logs: the node may clean up.
        kept = "" if proc.send(Command.RM + b"\n") else (
            f"its job directory {self.node.job_dir} was left on the node (the connection "
            "ended before clusterrun could say it may be removed)")
        proc.wait(timeout=10)
        if name == Event.EXIT:
            return NodeResult(self.node, NodeState.EXITED, ev["code"],
                              [RankFailure(**f) for f in ev.get("failures", [])], message=kept,
                              stopped=ev.get("stop_time") is not None)
        return NodeResult(self.node, NodeState.LOST, message="; ".join(m for m in (ev.get("reason", ""), kept) if m))

    def _broken(self, proc: Process, login: bytes | None = None) -> NodeResult | None:
        """EOF before the final event: the agent failed, or the connection did.
        (`login`: the session ended before the agent spoke; what the login printed.)"""
        if self.detached:
            raise Detached()
        code = proc.wait(timeout=2)
        if code is None or not self.transport.alive():
            return None
        if login is not None:
            if login:
                self.output.login(login if login.endswith(b"\n") else login + b"\n")
            why = login_failure(self.node, code, proc.stderr_text(), login)
            if self.attaching and self.node.host.slurm_job:
                # The node's job was started earlier, in a step of this Slurm job; no new
                # step starts (the job ended: "has expired", or slurmctld does not answer).
                return NodeResult(self.node, NodeState.LOST, code,
                                  message=f"no step of its Slurm job {self.node.host.slurm_job} could "
                                          f"be started to reach it ({why})")
        else:
            why = proc.stderr_text().strip() or f"the node agent exited with code {code}"
            if (self.started or self.attaching) and self.node.host.slurm_job:
                # On Slurm the node's job lives in the step of this session (proctrack
                # cgroup): the step ended, so did the job. Nothing to reconnect to.
                return NodeResult(self.node, NodeState.LOST, code,
                                  message=f"its srun step ended ({why}), and the node's job with it")
        return NodeResult(self.node, NodeState.FAILED_TO_START, code, message=why)

    def _say(self, text: str) -> None:
        """clusterrun's own words on the terminal, where this node's lines are shown."""
        if self.output.term is not None:
            self.output.term.message("clusterrun: " + text)

    def abandon(self, close: bool = True) -> None:
        """Ctrl-C before anything started: end this node's session now, not once its
        `setup:` is done (that setup ends on the node by itself), and reconnect to nothing.
        close=False: only reconnect to nothing (the caller ends the session: Session.end)."""
        self._abandoned = True
        self.reconnect = None
        agent = self._agent
        if agent is not None and close:
            agent.close()

    def detach(self) -> None:
        """Let go of the node; the job keeps running there."""
        self.detached = True
        self.transport.close()

    def stop(self, grace: float = 5.0) -> dict[str, Any]:
        """TERM, then KILL after grace, every process of this node's job; confirmed.

        The streaming agent does it when there is one (no new session, no login
        shell on the node); otherwise the kill mode runs in a session of its own.
        """
        # Fail fast and a `kill` may stop a node at the same time: the second caller
        # waits for the first's stop and gets its report, instead of waiting on the
        # same answer in vain and then killing again.
        asked = time.monotonic()
        with self._stop_lock:
            done = self._stop_report
            if done is not None and done[0] >= asked:
                return done[1]          # stopped while we waited for the lock
            report = self._stop(grace)
            self._stop_report = (time.monotonic(), report)
            return report

    def _stop(self, grace: float) -> dict[str, Any]:
        self.stopped = True
        while not self._kill_reports.empty():      # an answer nobody waited for (a stop passed on)
            self._kill_reports.get_nowait()
        agent = self._agent
        if agent is not None and agent.send(kill_command(grace)):
            report = self._await_report(grace)
            if report is not None:
                return report
        # No streaming agent, or it did not get the kill or answer: a session of its own.
        # The job may also be about to start (its session still opening) or to be
        # re-attached (its link down): the next agent kills it as soon as it streams.
        self._undelivered_stop = float(grace)
        try:
            return kill_job(self.node, self.transport, grace)
        except link_errors():       # no session now: the re-attach passes the stop on
            report = self._await_report(grace + self.reconnect_window)
            if report is None:
                raise
            return report

    def _await_report(self, timeout: float) -> dict[str, Any] | None:
        self._awaiting_report = True
        try:
            report = self._kill_reports.get(timeout=timeout + 15)
        except queue.Empty:
            return None
        finally:
            self._awaiting_report = False
        if report is not None:
            report["event"] = Event.KILLED
        return report


def confirm_kills(kills: Sequence[tuple[str, Callable[[], dict[str, Any]]]]) -> list[str]:
    """Run each node's kill in parallel; the problems: nodes not confirmed clean."""
    problems: list[str] = []
    for (name, _), o in zip(kills, each(kills, lambda k: k[1]())):
        if o.error is not None:             # report the node, the others went on
            problems.append(f"{name}: {type(o.error).__name__}: {o.error}")
        elif o.value is None or o.value.get("event") != Event.KILLED or o.value.get("left"):
            problems.append(f"{name}: {o.value}")
    return problems


def kill_job(node: NodePlan, transport: Transport, grace: float) -> dict[str, Any]:
    """Run the node agent's kill: returns its report once nothing of the job is left."""
    return run_agent(node, transport, kill_spec(node, grace))


class AgentError(Exception):
    """The node agent could not run (no python, no workdir) or said nothing."""


def run_agent(node: NodePlan, transport: Transport, spec: Spec, session: Session | None = None) -> dict[str, Any]:
    """Run a one-shot agent mode (kill, probe, stacks) and return its event (with "event").
    session: kept up to date, so that another thread can tell what it waits for and end it."""
    proc, mark = start_agent(node, transport, spec, session=session)
    try:
        spoke, login = read_preamble(proc, mark)
        if session is not None:
            session.spoke = spoke
        answer = FrameReader(proc).next_event() if spoke else None
        code = proc.wait(timeout=30)
        if answer is not None:
            return answer.report()
        if not spoke:
            raise AgentError(login_failure(node, code, proc.stderr_text(), login))
        err = proc.stderr_text().strip()
        raise AgentError(err.splitlines()[-1] if err else f"the node agent exited with code {code}")
    finally:
        proc.close()
