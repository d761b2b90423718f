"""Stream: whole lines from the nodes, tagged on the terminal, raw in per-rank logs.

This is the hottest path in clusterrun. Data arrives in chunks of whole lines
per output file; tagging a chunk is one bytes.replace, not a loop over lines,
and each chunk is one write to its log and one write to the terminal.
"""

from __future__ import annotations

import os
import sys
import threading
from time import monotonic
from typing import BinaryIO, Callable

from .launcherlog import LauncherFilter
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
    """One node's output: keeps every rank's log, and shows the lines asked for.

    `received` counts the bytes taken from each node-side file; it starts at the
    size of the local logs, so a new collector resumes exactly where the last
    one stopped.
    """

    def __init__(self, node: NodePlan, run: RunDir, term: Terminal | None, color: bool = False,
                 show: Callable[[str], bool] | None = None) -> None:
        self.node = node
        self.run = run
        self.term = term
        self.show = show
        self._routes: dict[str, tuple[bytes | None, BinaryIO]] = {}
        self._color = _COLORS[node.node_rank % len(_COLORS)] if color else 0
        self._launcher = LauncherFilter(self._held_back)
        self.last_line = monotonic()        # when a rank's line last came (the hang watch)
        self.received: dict[str, int] = {}
        starts = run.attempt_starts()       # after a restart: this attempt's bytes only
        for key, path in self._paths():
            try:
                self.received[key] = path.stat().st_size - starts.get(path.name, 0)
            except FileNotFoundError:
                pass

    def _paths(self):
        yield "L", self.run.node_log(self.node.node_rank)
        for local in range(self.node.nproc):
            yield str(local), self.run.rank_log(self.node.rank_start + local)

    def data(self, key: str, chunk: bytes) -> None:
        """A chunk of whole lines (ending in \n) from the node-side file `key`."""
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._route(key)
        tag, log = route
        log.write(chunk)
        self.received[key] = self.received.get(key, 0) + len(chunk)
        if key == "L":
            if tag is not None:
                chunk = self._launcher.feed(chunk)
                if chunk:
                    self.term.write(tag_lines(tag, chunk))
            return
        self.last_line = monotonic()
        if tag is not None:
            self.term.write(tag_lines(tag, chunk))

    def _held_back(self, n: int) -> bytes:
        return (f"(torchrun's own report of this, {n} lines, is in the node's log: "
                f"clusterrun logs {self.run.path.name} --node {self.node.name})\n").encode()

    def login(self, chunk: bytes) -> None:
        """Whole lines the node's login printed before the agent (a banner, conda):
        shown like torchrun's lines and kept in their own log, never in an offset."""
        route = self._routes.get("login")
        if route is None:
            route = self._routes["login"] = self._route("login")
        tag, log = route
        log.write(chunk)
        if tag is not None:
            self.term.write(tag_lines(tag, chunk))

    def _route(self, key: str) -> tuple[bytes | None, BinaryIO]:
        """key "L" is torchrun's own output, "login" the login's; a number is a worker's local rank."""
        if key == "login":
            label, path = self.node.name, self.run.login_log(self.node.node_rank)
        elif key == "L":
            label, path = self.node.name, self.run.node_log(self.node.node_rank)
        else:
            local = int(key)
            rank = self.node.rank_start + local
            label, path = f"{self.node.name} g{rank} l{local}", self.run.rank_log(rank)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log = os.fdopen(fd, "ab", buffering=0)
        if self.term is None or (self.show is not None and not self.show(key)):
            return None, log
        return tag_for(label, self._color), log

    def close(self) -> None:
        route = self._routes.get("L")
        rest = self._launcher.flush()
        if route is not None and route[0] is not None and rest:
            self.term.write(tag_lines(route[0], rest))
        for _, log in self._routes.values():
            log.close()
        self._routes.clear()


def tag_lines(tag: bytes, chunk: bytes) -> bytes:
    """Prefix every line of a chunk of whole lines: one replace, no loop over lines."""
    return tag + chunk[:-1].replace(b"\n", b"\n" + tag) + b"\n"


def tag_for(label: str, color: int = 0) -> bytes:
    """`[label] `, coloured when color is an ANSI colour number."""
    tag = f"\x1b[{color}m[{label}]\x1b[0m " if color else f"[{label}] "
    return tag.encode()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
