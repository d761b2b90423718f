"""torchrun's own lines about a failure, and what the terminal shows of them.

When a worker fails or a node is stopped, torchrun on that node logs that it is
closing its other workers, then ends with its own traceback (ChildFailedError or
SignalException) and, for a failure, a box of every local process it ended: about
35 lines per node, printed after the ranks' own tracebacks, and in the box the ranks
clusterrun stopped look like failures (`exitcode -15 (SIGTERM)`). clusterrun's
summary says all of it. So the terminal shows one line in their place, saying how
to see them; the node's log (`clusterrun logs --node NODE`) keeps every line.

Only those lines are held back: any other traceback of torchrun's (a rendezvous
error, a port in use) is shown whole, once its last line shows what it is.
"""

from __future__ import annotations

import re

# torchrun's log records about ending its workers (glog-style prefix).
_RECORD = re.compile(rb"[IWE]\d{4} [\d:.]+ +\d+ \S+\] (?:Sending process \d+ closing signal"
                     rb"|failed \(exitcode: |Received \d+ death signal)")
_TRACEBACK = b"Traceback (most recent call last):\n"
_REPORT = b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"
_SIGNALLED = b"torch.distributed.elastic.multiprocessing.api.SignalException:"
_TRIGGERS = (b"closing signal", b"failed (exitcode", b"death signal", _TRACEBACK)
_BOX_EDGE = b"=" * 20
# Between the tracebacks of a chain (SignalException raised while handling another).
_CHAIN = (b"\n", b"During handling of the above exception, another exception occurred:\n",
          b"The above exception was the direct cause of the following exception:\n")

_SHOW, _TRACE, _BOX, _AFTER = "show", "traceback", "box", "after"    # _AFTER: a chain may go on


class LauncherFilter:
    """Fed one node's launcher lines in chunks of whole lines; returns what to show.

    `hint(n)` is the line that stands in for n lines held back."""

    def __init__(self, hint) -> None:
        self._hint = hint
        self._state = _SHOW
        self._held: list[bytes] = []     # a traceback whose last line is still to come
        self._hidden = 0                 # lines held back since the last hint
        self._edges = 0                  # box edges seen

    def feed(self, chunk: bytes) -> bytes:
        if self._state is _SHOW and not self._hidden and not any(t in chunk for t in _TRIGGERS):
            return chunk
        out: list[bytes] = []
        for line in chunk.splitlines(keepends=True):
            self._line(line, out)
        return b"".join(out)

    def flush(self) -> bytes:
        """At the end of the stream: what is still held, and the hint if lines were held back."""
        out = self._held
        self._held = []
        if self._hidden:
            out.append(self._hint(self._hidden))
            self._hidden = 0
        self._state = _SHOW
        return b"".join(out)

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if self._state is _BOX:
            self._hidden += 1
            if line.startswith(_BOX_EDGE):
                self._edges += 1
                if self._edges == 2:
                    self._state = _AFTER
            return
        if self._state is _AFTER:
            if line in _CHAIN or _RECORD.match(line):
                self._hidden += 1
                return
            if line != _TRACEBACK:
                self._end_block(out)            # the report is over: one line in its place
        if self._state is _TRACE:
            self._held.append(line)
            if line[:1] in (b" ", b"\t"):
                return                                  # a frame
            if line.startswith(_REPORT):
                self._hide_held(_BOX)
                self._edges = 0
            elif line.startswith(_SIGNALLED):
                self._hide_held(_AFTER)
            else:                                       # someone else's traceback: show it
                if self._hidden:
                    out.append(self._hint(self._hidden))
                    self._hidden = 0
                out.extend(self._held)
                self._held = []
                self._state = _SHOW
            return
        if line == _TRACEBACK:
            self._held = [line]
            self._state = _TRACE
        elif _RECORD.match(line):
            self._hidden += 1
        else:
            if self._hidden:
                self._end_block(out)
            out.append(line)

    def _hide_held(self, then: str) -> None:
        self._hidden += len(self._held)
        self._held = []
        self._state = then

    def _end_block(self, out: list[bytes]) -> None:
        out.append(self._hint(self._hidden))
        self._hidden = 0
        self._state = _SHOW
