"""Transport: the connection to one node, over which every command of a run goes.

What every transport offers (Transport, Process), and the one for `localhost`
nodes: commands as local subprocesses. The SSH transports are paramiko.py and
openssh.py; connect.py picks a node's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Protocol

from ..errors import UnreachableError



class Output(Protocol):
    """A command's stdout as its readers use it: a file object of bytes (a pipe's, or
    paramiko's ChannelFile, which is no io class)."""

    def readline(self, size: int = -1, /) -> bytes: ...
    def read(self, size: int = -1, /) -> bytes: ...


class Process(Protocol):
    """A command running on a node."""

    @property
    def stdout(self) -> Output:
        """Its output (a plain attribute in each transport: read-only here, so that each
        may keep its own file type)."""

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

    @property
    def peer_addr(self) -> str:
        """The address we actually reached the node at (openssh learns it on first use)."""

    def exec(self, command: str, merge_stderr: bool = False) -> Process: ...
    def alive(self) -> bool: ...
    def close(self, linger: bool = False) -> None:
        """End the connection. linger: another process takes this run's connections
        over (`up -d`): openssh keeps its master for it a while."""


def link_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a node's connection broke. paramiko's are among them
    only once paramiko is loaded (nothing else raises them), so that the commands
    that never connect (`ps`, `status` and `logs` of an ended run) never import it."""
    paramiko = sys.modules.get("paramiko")
    base: tuple[type[BaseException], ...] = (OSError, EOFError, UnreachableError)
    return base + (paramiko.SSHException,) if paramiko is not None else base
