"""Stream: whole lines from the nodes, tagged on the terminal, raw in per-rank logs.

This is the hottest path in clusterrun. Data arrives in chunks of whole lines
per output file; tagging a chunk is one bytes.replace, not a loop over lines,
and each chunk is one write to its log and one write to the terminal.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import BinaryIO

from .plan import NodePlan
from .runs import RunDir

_COLORS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)


def use_color(stream: BinaryIO | None = None, no_color: bool = False) -> bool:
    """Colour only on a terminal, and never with --no-color or NO_COLOR set."""
    if no_color or os.environ.get("NO_COLOR"):
        return False
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Terminal:
    """Serialises chunks of tagged lines from all nodes onto stdout.

    A chunk is written whole under one lock, so lines from different nodes never
    splice. A progress line on stderr (terminals only) is cleared before output.
    """

    def __init__(self, out: BinaryIO | None = None, err=None) -> None:
        self._out = out or sys.stdout.buffer
        self._err = err or sys.stderr
        self._lock = threading.Lock()
        self._progress = ""
        self._show_progress = _isatty(self._err)
        self._closed = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            if self._progress:
                self._err.write("\r\x1b[K")
                self._err.flush()
                self._progress = ""
            try:
                self._out.write(data)
                self._out.flush()
            except BrokenPipeError:     # `| head`: keep logging, stop printing
                self._closed = True

    def progress(self, text: str) -> None:
        """Replace the one progress line (stderr, terminals only)."""
        if not self._show_progress:
            return
        with self._lock:
            self._err.write("\r\x1b[K" + text)
            self._err.flush()
            self._progress = text

    def clear_progress(self) -> None:
        self.progress("")

    def message(self, text: str) -> None:
        """clusterrun's own words: untagged, on stderr."""
        with self._lock:
            if self._progress:
                self._err.write("\r\x1b[K")
                self._progress = ""
            self._err.write(text + "\n")
            self._err.flush()


class NodeOutput:
    """One node's output: tags its lines and keeps every rank's log.

    `received` counts the bytes taken from each node-side file, which is exactly
    where a reconnect resumes.
    """

    def __init__(self, node: NodePlan, run: RunDir, term: Terminal, color: bool) -> None:
        self.node = node
        self.run = run
        self.term = term
        self.received: dict[str, int] = {}
        self._routes: dict[str, tuple[bytes, BinaryIO]] = {}
        self._logs: dict[int, BinaryIO] = {}
        self._color = _COLORS[node.node_rank % len(_COLORS)] if color else 0

    def data(self, key: str, chunk: bytes) -> None:
        """A chunk of whole lines (ending in \\n) from the node-side file `key`."""
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._route(key)
        tag, log = route
        log.write(chunk)
        self.term.write(tag + chunk[:-1].replace(b"\n", b"\n" + tag) + b"\n")
        self.received[key] = self.received.get(key, 0) + len(chunk)

    def _route(self, key: str) -> tuple[bytes, BinaryIO]:
        """key "L" is torchrun's own output; "<attempt>/<local rank>" a worker's."""
        if key == "L":
            label, log_id, path = self.node.name, -1, self.run.node_log(self.node.node_rank)
        else:
            local = int(key.rpartition("/")[2])
            rank = self.node.rank_start + local
            label, log_id, path = f"{self.node.name} g{rank} l{local}", rank, self.run.rank_log(rank)
        log = self._logs.get(log_id)
        if log is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            log = self._logs[log_id] = os.fdopen(fd, "ab", buffering=0)
        tag = f"\x1b[{self._color}m[{label}]\x1b[0m " if self._color else f"[{label}] "
        return tag.encode(), log

    def close(self) -> None:
        for log in self._logs.values():
            log.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
