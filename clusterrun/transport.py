"""Transport: the connection to one node, over which every command of a run goes.

What every transport offers (Transport, Process), and the one for `localhost`
nodes: commands as local subprocesses. The SSH transports are paramikossh.py and
openssh.py; connect.py picks a node's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import IO, Protocol

from .errors import UnreachableError



class Process(Protocol):
    """A command running on a node."""

    stdout: IO[bytes]

    def send(self, data: bytes) -> bool:
        """Write to the command's stdin; False if it could not (the command or link ended)."""
    def set_read_timeout(self, seconds: float | None) -> None: ...
    def close_stdin(self) -> None: ...
    def read_some(self, n: int) -> bytes: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def stderr_text(self) -> str: ...
    def close(self) -> None: ...


class Transport(Protocol):
    name: str
    peer_addr: str          # the address we actually reached the node at

    def exec(self, command: str, merge_stderr: bool = False) -> Process: ...
    def alive(self) -> bool: ...
    def close(self, linger: bool = False) -> None:
        """End the connection. linger: another process takes this run's connections
        over (`up -d`): openssh keeps its master for it a while."""


# --- localhost ---------------------------------------------------------------

class LocalProcess:
    def __init__(self, command: str, merge_stderr: bool = False) -> None:
        self._err = tempfile.TemporaryFile()
        # Like sshd: the user's shell runs the command line. A session of its own:
        # a Ctrl-C on the terminal reaches the controller only, which then tears
        # the job down in order.
        shell = os.environ.get("SHELL") or "/bin/sh"
        self._p = subprocess.Popen(
            [shell, "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else self._err, start_new_session=True,
        )
        assert self._p.stdout is not None
        self.stdout = self._p.stdout

    def read_some(self, n: int) -> bytes:
        """Whatever output is there (at least one byte), or b"" at the end."""
        return self.stdout.read1(n)  # type: ignore[attr-defined]

    def send(self, data: bytes) -> bool:
        try:
            assert self._p.stdin is not None
            self._p.stdin.write(data)
            self._p.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

    def close_stdin(self) -> None:
        if self._p.stdin:
            try:
                self._p.stdin.close()
            except BrokenPipeError:     # flushing into a process that has ended
                pass

    def set_read_timeout(self, seconds: float | None) -> None:
        pass                        # a local pipe does not go silent without the process ending

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self) -> str:
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self._p.poll() is None:
            self._p.kill()
            self._p.wait()
        for f in (self._p.stdin, self._p.stdout, self._err):
            if f:
                f.close()


class LocalTransport:
    peer_addr = "127.0.0.1"

    def __init__(self, name: str) -> None:
        self.name = name

    def exec(self, command: str, merge_stderr: bool = False) -> Process:
        return LocalProcess(command, merge_stderr)

    def alive(self) -> bool:
        return True

    def close(self, linger: bool = False) -> None:
        pass


def link_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a node's connection broke. paramiko's are among them
    only once paramiko is loaded (nothing else raises them), so that the commands
    that never connect (`ps`, `status` and `logs` of an ended run) never import it."""
    paramiko = sys.modules.get("paramiko")
    base: tuple[type[BaseException], ...] = (OSError, EOFError, UnreachableError)
    return base + (paramiko.SSHException,) if paramiko is not None else base
