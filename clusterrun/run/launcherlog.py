"""torchrun's own lines about a failure, and what the terminal shows of them.

When a worker fails or a node is stopped, torchrun on that node logs that it is
closing its other workers, then ends with its own traceback (ChildFailedError or
SignalException) and, for a failure, a box of every local process it ended: about
35 lines per node, printed after the ranks' own tracebacks, and in the box the ranks
clusterrun stopped look like failures (`exitcode -15 (SIGTERM)`). clusterrun's
summary says all of it. So the terminal shows one line in their place, saying how
to see them; the node's log (`clusterrun logs --node NODE`) keeps every line.

A stop sends torchrun SIGTERM twice (its group's, then its own), and its handler
raises wherever Python is: so the report may go on with a chain, a SignalException
in an atexit callback or a finalizer ("Exception ignored in ..."), a traceback with a
blank line among its frames, or Python's dump of an exception it failed to print.
A traceback (or chain) is held until its last line says whose it is.

Only those lines are held back: any other traceback of torchrun's (a rendezvous
error, a port in use), or chain of them, is shown whole, once the line after it
shows that the chain is over.
"""

from __future__ import annotations

import re

# torchrun's log records about ending its workers (glog-style prefix).
_RECORD = re.compile(rb"[IWE]\d{4} [\d:.]+ +\d+ \S+\] (?:Sending process \d+ closing signal"
                     rb"|failed \(exitcode: |Received \d+ death signal)")
_TRACEBACK = b"Traceback (most recent call last):\n"
# Python's header over an exception it could not raise (an atexit callback, a finalizer),
# followed by its traceback: torchrun's signal handler may fire in one while it exits.
_IGNORED = b"Exception ignored in"
_REPORT = b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"
_SIGNALLED = b"torch.distributed.elastic.multiprocessing.api.SignalException:"
_TRIGGERS = (b"closing signal", b"failed (exitcode", b"death signal", _TRACEBACK, _IGNORED)
_BOX_EDGE = b"=" * 20
# What Python prints when printing an exception itself failed (torchrun's signal handler
# raised while the traceback was written): a dump of the exception object, then maybe
# "lost sys.stderr". The dump's type name says whose exception it was.
_DUMP = re.compile(rb"object (?:address|refcount|type|type name|repr) *: |lost sys\.stderr\n")
_DUMP_NAME = b"object type name: "
_TORCHRUNS = (b"ChildFailedError\n", b"SignalException\n")
# Between the tracebacks of a chain (SignalException raised while handling another).
_CHAIN = (b"\n", b"During handling of the above exception, another exception occurred:\n",
          b"The above exception was the direct cause of the following exception:\n")

# _TRACE: a traceback (and the chain before it) whose last line is still to come;
# _AFTER: torchrun's report is over, but a chain may go on; _FOREIGN: a traceback that is
# not torchrun's has ended, held until the next line shows whether a chain goes on (and
# ends in torchrun's report, which makes the whole chain torchrun's).
_SHOW, _TRACE, _BOX, _AFTER, _FOREIGN = "show", "traceback", "box", "after", "foreign"


class LauncherFilter:
    """Fed one node's launcher lines in chunks of whole lines; returns what to show.

    `hint(n)` is the line that stands in for n lines held back."""

    def __init__(self, hint) -> None:
        self._hint = hint
        self._state = _SHOW
        self._held: list[bytes] = []     # a traceback (chain) whose last line is still to come
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
        """At the end of the stream: the hint if lines were held back, then what is still held."""
        out = []
        if self._hidden:
            out.append(self._hint(self._hidden))
            self._hidden = 0
        out += self._held
        self._held = []
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
            if line in _CHAIN or _RECORD.match(line) or _DUMP.match(line):
                self._hidden += 1
                return
            if not _starts_traceback(line):
                self._end_block(out)            # the report is over: one line in its place
        if self._state is _FOREIGN:
            if line in _CHAIN or _starts_traceback(line):
                self._held.append(line)         # the chain goes on
                self._state = _TRACE
                return
            self._show_held(out)                # it was someone else's traceback: show it
        if self._state is _TRACE:
            self._held.append(line)
            # A frame, or a blank line among the frames (Python prints one after a frame
            # whose source line it shows as `def ...:`, e.g. a signal handler that ran as
            # `signal.Signals.__new__` was entered), or the chain's next part.
            if line[:1] in (b" ", b"\t") or not line.strip() or line in _CHAIN or _starts_traceback(line):
                return
            if _DUMP.match(line):                   # printing it failed: whose was it?
                if line.startswith(_DUMP_NAME) and line[len(_DUMP_NAME):] in _TORCHRUNS:
                    self._hide_held(_AFTER)
                return
            if line.startswith(_REPORT):
                self._hide_held(_BOX)
                self._edges = 0
            elif line.startswith(_SIGNALLED):
                self._hide_held(_AFTER)
            else:                               # an exception's line: the chain may go on
                self._state = _FOREIGN
            return
        if _starts_traceback(line):
            self._held = [line]
            self._state = _TRACE
        elif _RECORD.match(line):
            self._hidden += 1
        else:
            if self._hidden:
                self._end_block(out)
            out.append(line)

    def _show_held(self, out: list[bytes]) -> None:
        if self._hidden:
            out.append(self._hint(self._hidden))
            self._hidden = 0
        out.extend(self._held)
        self._held = []
        self._state = _SHOW

    def _hide_held(self, then: str) -> None:
        self._hidden += len(self._held)
        self._held = []
        self._state = then

    def _end_block(self, out: list[bytes]) -> None:
        out.append(self._hint(self._hidden))
        self._hidden = 0
        self._state = _SHOW


def _starts_traceback(line: bytes) -> bool:
    return line == _TRACEBACK or line.startswith(_IGNORED)
