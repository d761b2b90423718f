"""Stream: whole lines from the nodes, tagged on the terminal, raw in per-rank logs.

This is the hottest path in clusterrun. Data arrives in chunks of whole lines
per output file; tagging a chunk is one bytes.replace, not a loop over lines,
and each chunk is one write to its log and one write to the terminal.

A progress bar (tqdm, and what HF Trainer prints) redraws one line with carriage
returns and ends it only when it is done. The node agent passes each redraw on at
once; the terminal shows it as its progress line, and the line it ends with as
the last redraw alone. Only chunks with a carriage return take that way.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from time import monotonic
from typing import IO, Any, BinaryIO, Callable

from .launcherlog import LauncherFilter
from ..plan import NodePlan
from .runs import RunDir

_COLORS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)


def use_color(stream: IO[Any] | None = None, no_color: bool = False) -> bool:
    """Colour only on a terminal (stdout unless `stream` is given), and never with
    --no-color or NO_COLOR set."""
    if no_color or os.environ.get("NO_COLOR"):
        return False
    out: IO[Any] = stream or sys.stdout
    try:
        return out.isatty()
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
        self._bar: tuple[bytes, float] | None = None    # whose bar the progress line shows, since when

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

    def bar(self, tag: bytes, redraw: bytes) -> None:
        """A rank's progress bar, at its latest redraw, as the progress line; b"": the
        bar ended. The rank whose bar shows keeps the line while it redraws, so that
        the bars of several ranks do not take turns on it."""
        if not self._show_progress:
            return
        now = monotonic()
        with self._lock:
            if self._bar is not None and self._bar[0] != tag and now - self._bar[1] < BAR_HOLD:
                return
            if not redraw:
                self._bar = None
                return
            self._bar = (tag, now)
            label = _ESCAPES.sub("", tag.decode("utf-8", "replace"))
            text = _ESCAPES.sub("", redraw.decode("utf-8", "replace"))
            self._progress = label + text[:max(0, _columns(self._err) - len(label) - 1)]
            self._err.write("\r\x1b[K" + self._progress)
            self._err.flush()

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
        self._open: dict[str, bytes] = {}   # per file: the last redraw of a line not ended yet
        self.line_at: dict[str, float] = {}  # local rank -> when its last line came (the hang watch)
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
        """A chunk from the node-side file `key`: whole lines (ending in \n), else the
        redraws of a progress bar (see the module's doc)."""
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._route(key)
        tag, log = route
        log.write(chunk)
        self.received[key] = self.received.get(key, 0) + len(chunk)
        if key != "L":
            self.line_at[key] = monotonic()
        term = self.term
        if tag is None or term is None:     # (a tag means a terminal: see _route)
            return
        redraw = None
        if b"\r" in chunk or key in self._open or chunk[-1:] != b"\n":
            chunk, redraw = self._redrawn(key, chunk)
        if key == "L":
            chunk = self._launcher.feed(chunk)
        if chunk:
            term.write(tag_lines(tag, chunk))
        if redraw is not None:              # after the lines that came before it
            term.bar(tag, redraw)

    def _redrawn(self, key: str, chunk: bytes) -> tuple[bytes, bytes | None]:
        """The whole lines of a chunk with carriage returns as a terminal shows them
        (each its last redraw), and the line still being redrawn (b"": none), which is
        kept for when it ends and shown meanwhile as the progress line."""
        data = self._open.pop(key, b"") + chunk
        end = data.rfind(b"\n") + 1
        lines, rest = shown_lines(data[:end]), data[end:]
        if rest and b"\r" not in rest:     # a runaway line (no newline for LINE_MAX): shown in pieces
            return lines + rest + b"\n", None
        redraw = last_redraw(rest)
        if rest:
            self._open[key] = b"\r" + redraw
        return lines, redraw

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
        if tag is not None and self.term is not None:
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
        if route is not None and route[0] is not None and rest and self.term is not None:
            self.term.write(tag_lines(route[0], rest))
        for _, log in self._routes.values():
            log.close()
        self._routes.clear()


def tag_lines(tag: bytes, chunk: bytes) -> bytes:
    """Prefix every line of a chunk of whole lines: one replace, no loop over lines."""
    return tag + chunk[:-1].replace(b"\n", b"\n" + tag) + b"\n"


def shown_lines(chunk: bytes) -> bytes:
    """Whole lines as a terminal leaves them: a line redrawn with carriage returns
    (a progress bar) as its last redraw; `\r\n` as `\n`."""
    if b"\r" not in chunk:
        return chunk
    return b"".join(last_redraw(line) + b"\n" for line in chunk[:-1].split(b"\n"))


def last_redraw(text: bytes) -> bytes:
    """What follows the last carriage return that something follows."""
    return text.rstrip(b"\r").rsplit(b"\r", 1)[-1]


BAR_HOLD = 2.0      # seconds a rank's bar keeps the progress line after its last redraw
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _columns(stream) -> int:
    """The terminal's width (80 where it does not say: a pty nobody sized has 0)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def tag_for(label: str, color: int = 0) -> bytes:
    """`[label] `, coloured when color is an ANSI colour number."""
    tag = f"\x1b[{color}m[{label}]\x1b[0m " if color else f"[{label}] "
    return tag.encode()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
