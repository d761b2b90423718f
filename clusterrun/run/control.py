"""The run's control socket: how `kill` reaches the run's live collector.

The collector (the attached `up`, or the background one of `up --detach`)
already holds an SSH connection to every node with a node agent streaming on
it. Asked over runs/<id>/control.sock, it has those agents kill the job: no
new SSH handshake, no login shell, no Python start on any node. With no
collector answering, `kill` connects to the nodes itself (commands/kill.py).

Protocol: one request line of JSON, {"kill": GRACE}; one answer line,
{"problems": [...]}, sent once every node has confirmed and the run's end is
recorded. The socket lives in the run's private directory (mode 0700).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .runs import RunDir

SOCKET = "control.sock"
_SUN_PATH_MAX = 100         # sockaddr_un holds 104-108 bytes, depending on the system


@contextmanager
def _address(path: Path) -> Iterator[str]:
    """A socket address for path that fits sockaddr_un (Linux: through /proc for long paths)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    """Answers kill requests for one run while its collector runs."""

    def __init__(self, run: RunDir, on_kill: Callable[[float], list[str]]) -> None:
        self.path = run.path / SOCKET
        self.on_kill = on_kill
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink(missing_ok=True)       # a dead collector's; we hold the run's lock
            with _address(self.path) as addr:
                self.sock.bind(addr)
            self.ino = self.path.stat().st_ino
            self.sock.listen(4)
        except OSError:
            self.sock.close()
            raise
        self.answering: list[threading.Thread] = []
        threading.Thread(target=self._serve, name="control", daemon=True).start()

    @classmethod
    def start(cls, run: RunDir, on_kill: Callable[[float], list[str]]) -> "ControlServer | None":
        """The server, or None where the socket cannot be made (kill then goes over SSH)."""
        try:
            return cls(run, on_kill)
        except OSError:
            return None

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:             # closed
                return
            t = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self.answering.append(t)
            t.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            try:
                grace = float(json.loads(f.readline())["kill"])
            except (ValueError, KeyError, TypeError):
                return
            f.write(json.dumps({"problems": self.on_kill(grace)}).encode() + b"\n")
            f.flush()

    def close(self, wait: float = 10.0) -> None:
        """Stop taking requests, finish answering those taken (the collector process
        must not exit under them), and remove the socket unless a newer collector
        has made its own."""
        try:
            if self.path.stat().st_ino == self.ino:
                self.path.unlink()
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.sock.close()
        for t in self.answering:
            t.join(wait)


def request_kill(run: RunDir, grace: float) -> list[str] | None:
    """Have the run's collector kill it: the problems it found, or None if no collector answered."""
    path = run.path / SOCKET
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as addr:
            sock.connect(addr)
        sock.settimeout(grace + 60)
        with sock.makefile("rwb") as f:
            f.write(json.dumps({"kill": grace}).encode() + b"\n")
            f.flush()
            return list(json.loads(f.readline())["problems"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        sock.close()
