"""Transport: one connection per node, over which every command of a run goes.

`localhost` nodes run commands as local subprocesses. Every other node is an
ssh target as OpenSSH understands it, reached on one of two stacks (the host's
`transport:`): paramiko (`paramikossh`, the default: one connection per node,
configured by `ssh -G`), or the system ssh client (`openssh`: one ControlMaster
per node, for what only OpenSSH can do: 2FA prompts, GSSAPI, FIDO keys, host
certificates). Unknown host keys are refused unless asked to accept new ones; a
changed host key is always refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import IO, Protocol, Sequence

from .errors import UnreachableError
from .hostsfile import Host
from .parallel import each



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


# --- connecting ----------------------------------------------------------------

def connect_node(host: Host, timeout: float | None, accept_new: bool = False,
                 scope: str | None = None) -> Transport:
    """One node's transport: local for localhost, else an SSH connection on the
    host's stack. `scope` is the run it serves (None: this command only); on the
    openssh stack a run's ControlMaster outlives the command, so that a detached
    run's collector and later `logs`/`kill` reuse its authentication."""
    if host.is_local:
        return LocalTransport(host.name)
    if host.transport == "openssh":
        from .openssh import connect_openssh
        return connect_openssh(
            host.name, host.host, user=host.user, port=host.port, identity_file=host.identity_file,
            timeout=timeout, accept_new=accept_new,
            scope=scope or f"pid{os.getpid()}", persist=scope is not None)
    from .paramikossh import connect
    from .sshconfig import resolve
    target = resolve(host.host, user=host.user, port=host.port, identity_file=host.identity_file,
                     node=host.name)
    return connect(host.name, target, timeout, accept_new)


def connect_each(hosts: Sequence[Host], timeout: float | None, accept_new: bool = False,
                 scope: str | None = None) -> list[tuple[Transport | None, str, float]]:
    """Connect to every node in parallel: (transport or None, error, seconds) per node."""

    def one(host: Host) -> tuple[Transport, float]:
        t0 = time.monotonic()
        return connect_node(host, timeout, accept_new, scope), time.monotonic() - t0

    out: list[tuple[Transport | None, str, float]] = []
    for host, o in zip(hosts, each(hosts, one)):
        if o.error is None:
            assert o.value is not None
            out.append((o.value[0], "", o.value[1]))
        elif isinstance(o.error, UnreachableError):
            out.append((None, str(o.error), 0.0))
        else:                   # never a traceback, never a silent success
            out.append((None, f"{host.name}: {type(o.error).__name__}: {o.error}", 0.0))
    return out


def connect_all(
    hosts: Sequence[Host], timeout: float | None, accept_new: bool = False,
    consequence: str = "nothing was started", scope: str | None = None,
) -> list[Transport]:
    """Connect to every node in parallel; all or nothing.

    Raises UnreachableError naming every node that failed (and closes the rest),
    so that nothing is started anywhere unless every node is ready.
    """
    results = connect_each(hosts, timeout, accept_new, scope)
    errors = [err for t, err, _ in results if t is None]
    if errors:
        for t, _, _ in results:
            if t is not None:
                t.close()
        raise UnreachableError(f"cannot reach every node, {consequence}:\n  " + "\n  ".join(errors))
    return [t for t, _, _ in results if t is not None]
