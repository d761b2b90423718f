"""The transport for `localhost` nodes: commands as local subprocesses."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile

from .base import Process


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
        out = self._p.stdout
        assert isinstance(out, io.BufferedReader)       # a pipe, buffered (Popen's default)
        self.stdout = out

    def read_some(self, n: int) -> bytes:
        """Whatever output is there (at least one byte), or b"" at the end."""
        return self.stdout.read1(n)

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
