"""A fake transport for unit tests: a scripted node agent behind the Transport protocol.

The controller side (remote.RemoteJob, controller.RunController) runs for real;
only the connection is fake. A FakeProcess's stdout carries exactly the bytes a
real node agent writes, encoded with the agent's own definitions (clusterrun/nodeagent.py,
"the protocol"): whatever the login printed, the agent's own line (a newline, AGENT_MARK
and the session's token), then frames: data_frame(key, chunk), event_frame(name,
**fields), HEARTBEAT.

A test feeds that output as it goes (from its own thread, or from a hook the
process calls when the controller writes to it), can end it like a lost link
(hang_up: EOF, no exit status) or like an agent that exited (exit), and reads
back every byte the controller wrote to the process's stdin (the shipped agent,
its spec, then commands: go, stop, kill <grace>, rm). The transport records each
command line it was asked to run.

tests/test_remote_unit.py checks these frames against the agent's own encoder,
and the whole output against a real agent's, so the fake cannot drift from it.
"""

from __future__ import annotations

import io
import json
import queue
import re
import socket
import threading
import weakref
from typing import Any, Callable

from clusterrun import nodeagent
from clusterrun.errors import UnreachableError
from clusterrun.nodeagent import AGENT_MARK, HEARTBEAT, Command, event_frame
from clusterrun.run.stream import Terminal


def data_frame(key: str, chunk: bytes) -> bytes:
    """Whole lines from one node-side file: key nodeagent.LAUNCHER_KEY is launcher.log, a
    number a local rank (the agent writes the header and the chunk apart)."""
    return nodeagent.data_header(key, len(chunk)) + chunk


class FakeStdout:
    """A blocking byte stream fed by the test: readline/read/read1 as on a pipe or an
    SSH channel file. With a read timeout set, a read that waits longer raises
    socket.timeout, as a silent SSH channel does."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._cv = threading.Condition()
        self.timeout: float | None = None

    def feed(self, data: bytes) -> None:
        with self._cv:
            if self._eof:       # nobody reads any more (as a pipe whose reader has gone)
                return
            self._buf += data
            self._cv.notify_all()

    def end(self) -> None:
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        # (under self._cv)
        if not self._cv.wait_for(lambda: ready() or self._eof, self.timeout):
            raise socket.timeout("timed out (fake)")

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def readline(self) -> bytes:
        with self._cv:
            self._wait(lambda: b"\n" in self._buf)
            nl = self._buf.find(b"\n")
            return self._take(nl + 1 if nl >= 0 else len(self._buf))

    def read(self, n: int = -1) -> bytes:
        with self._cv:
            if n < 0:
                self._wait(lambda: False)
                return self._take(len(self._buf))
            self._wait(lambda: len(self._buf) >= n)
            return self._take(n)

    def read1(self, n: int = -1) -> bytes:
        with self._cv:
            self._wait(lambda: bool(self._buf))
            return self._take(len(self._buf) if n < 0 else n)

    def close(self) -> None:
        self.end()


_live: "weakref.WeakSet[FakeProcess]" = weakref.WeakSet()
_ended = threading.Event()


def hang_up_all() -> None:
    """End every fake session, now and from now on, so that no thread of a failed
    test stays blocked on one (test teardown; see the `fakes` fixtures)."""
    _ended.set()
    for p in list(_live):
        p.hang_up()


def reset() -> None:
    """New sessions live again (test setup)."""
    _ended.clear()


def script_of(line: str) -> str:
    """The POSIX sh script in a line made by login.for_any_shell (a line that is not one:
    itself)."""
    m = re.fullmatch(r"""exec /bin/sh -c 'eval "\$\(printf "(.*)"\)"'""", line, re.S)
    if m is None:
        return line
    return re.sub(rb"\\([0-7]{3})", lambda o: bytes([int(o.group(1), 8)]), m.group(1).encode()).decode()


class FakeProcess:
    """One session on a fake node: the Process protocol, scripted and recorded."""

    def __init__(self, command: str, transport: "FakeTransport") -> None:
        self.command = command
        self.script = script_of(command)     # the sh script the line has /bin/sh run
        self.transport = transport
        # An agent command ends with the loader's argument: the session's token.
        self.token: str | None = self.script.rsplit(" ", 1)[-1] if " -c " in self.script else None
        self.stdout = FakeStdout()
        self.stdin = bytearray()            # every byte the controller wrote, in order
        self.shipped: bytes | None = None   # stdin's first line: the agent's code
        self.spec: dict[str, Any] | None = None     # stdin's second line: the mode's spec
        self.commands: list[bytes] = []     # every later stdin line, without its newline
        self.returncode: int | None = None
        self.stderr = ""
        self.accepts_stdin = True           # False: send() fails, as on a closed channel
        self.read_timeouts: list[float | None] = []
        self.closed = False
        self.hung_up = False
        # Called with (process, line) for each command line, in the writer's thread:
        # how a test plays the agent's answer to `kill`, `go`.
        self.on_command: Callable[[FakeProcess, bytes], None] | None = None
        self._cv = threading.Condition()
        _live.add(self)
        if _ended.is_set():
            self.hang_up()

    # --- scripting the agent's output -------------------------------------------------

    def preamble(self, login: bytes = b"") -> "FakeProcess":
        """What the login printed, then the agent's first line (with this session's token)."""
        if self.token is None:
            raise AssertionError(f"not an agent command: {self.command!r}")
        self.stdout.feed(login + b"\n" + AGENT_MARK + self.token.encode() + b"\n")
        return self

    def data(self, key: str, chunk: bytes) -> "FakeProcess":
        self.stdout.feed(data_frame(key, chunk))
        return self

    def event(self, name: str, **fields: Any) -> "FakeProcess":
        self.stdout.feed(event_frame(name, **fields))
        return self

    def heartbeat(self) -> "FakeProcess":
        self.stdout.feed(HEARTBEAT)
        return self

    def write(self, raw: bytes) -> "FakeProcess":
        """Any bytes at all (a frame cut short, a stray line)."""
        self.stdout.feed(raw)
        return self

    def hang_up(self) -> None:
        """The link is lost: EOF mid-stream and no exit status (ssh's wait gives none)."""
        with self._cv:
            self.hung_up = True
            self._cv.notify_all()
        self.stdout.end()

    def exit(self, code: int = 0, stderr: str = "") -> None:
        """The command ended with this code (its output ends with it)."""
        with self._cv:
            if self.returncode is None:
                self.returncode = code
                self.stderr += stderr
            self._cv.notify_all()
        self.stdout.end()

    # --- what the controller wrote --------------------------------------------------

    def wait_for_spec(self, timeout: float = 5.0) -> dict[str, Any]:
        """The spec the controller sent (the mode, its fields), once sent."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.spec is not None, timeout):
                raise AssertionError(f"no spec on {self.transport.name}'s stdin within {timeout}s")
            assert self.spec is not None
            return self.spec

    def wait_for_command(self, prefix: bytes, timeout: float = 5.0) -> bytes:
        """The first command line starting with prefix, once the controller has written it."""
        with self._cv:
            found = self._cv.wait_for(
                lambda: next((c for c in self.commands if c.startswith(prefix)), None), timeout)
        if found is None:
            raise AssertionError(f"no {prefix!r} on {self.transport.name}'s stdin within {timeout}s; "
                                 f"commands: {self.commands}")
        return found

    # --- the Process protocol ---------------------------------------------------------

    def send(self, data: bytes) -> bool:
        if not self.accepts_stdin or self.closed:
            return False
        new: list[bytes] = []
        with self._cv:
            self.stdin += data
            lines = bytes(self.stdin).split(b"\n")[:-1]
            if self.shipped is None and len(lines) >= 1:
                self.shipped = lines[0]
            got_spec = self.spec is None and len(lines) >= 2
            if got_spec:
                self.spec = json.loads(lines[1])
            new = lines[2 + len(self.commands):]
            self.commands += new
            self._cv.notify_all()
        if got_spec and self.transport.agent is not None:
            self.transport.agent(self)
        for line in new:
            if self.on_command is not None:
                self.on_command(self, line)
            if line in (Command.RM, Command.STOP):      # the real agent's last command: it exits
                self.exit(0)
        return True

    def set_read_timeout(self, seconds: float | None) -> None:
        self.read_timeouts.append(seconds)
        self.stdout.timeout = seconds

    def close_stdin(self) -> None:
        self.accepts_stdin = False

    def read_some(self, n: int) -> bytes:
        return self.stdout.read1(n)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code; None at once after a hang-up (a lost link has none to give)."""
        with self._cv:
            self._cv.wait_for(lambda: self.returncode is not None or self.hung_up, timeout)
            return self.returncode

    def stderr_text(self) -> str:
        return self.stderr

    def close(self) -> None:
        self.closed = True
        self.stdout.end()


class FakeTransport:
    """A node's connection: each exec() is a FakeProcess, recorded.

    agent: called with each process once the controller has sent it its spec (so
    the mode is known), in the controller's thread: plays the node agent.
    Otherwise the test takes each process with next_process() and plays it."""

    def __init__(self, name: str = "gpu-a", peer_addr: str = "10.0.0.1",
                 agent: Callable[[FakeProcess], None] | None = None) -> None:
        self.name, self.peer_addr = name, peer_addr
        self.agent = agent
        self.linked = True                  # alive(); exec() fails once False (lost, or closed)
        self.closes: list[bool] = []        # each close(), its linger
        self.execs: list[str] = []          # every command line run, in order
        self.refused: list[str] = []        # every command line refused (the link was down)
        # Called with each command line before its session opens: a test can hold it
        # there (a slow login, a slow session open).
        self.before_exec: Callable[[str], None] | None = None
        self.processes: list[FakeProcess] = []
        self._new: queue.Queue[FakeProcess] = queue.Queue()

    def exec(self, command: str, merge_stderr: bool = False) -> FakeProcess:
        if self.before_exec is not None:
            self.before_exec(command)
        if not self.linked:         # as both real transports: no session once closed or lost
            self.refused.append(command)
            raise UnreachableError(f"{self.name}: the SSH connection was lost")
        self.execs.append(command)
        p = FakeProcess(command, self)
        self.processes.append(p)
        self._new.put(p)
        return p

    def next_process(self, timeout: float = 5.0) -> FakeProcess:
        """The next session the controller opened (waits for it)."""
        try:
            return self._new.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no new session within {timeout}s") from None

    def alive(self) -> bool:
        return self.linked

    def close(self, linger: bool = False) -> None:
        self.closes.append(linger)
        self.linked = False


class Screen:
    """What the user sees: a Terminal writing to memory (stdout bytes, stderr text), not a tty."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.err = io.StringIO()
        self.term = Terminal(self.out, self.err)

    @property
    def text(self) -> bytes:
        return self.out.getvalue()

    @property
    def messages(self) -> list[str]:
        return self.err.getvalue().splitlines()
