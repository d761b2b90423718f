"""The node agent's output, read on the controller: the login's lines, then frames.

The wire format is defined in clusterrun/nodeagent.py ("the protocol"); this is its
only reader. RemoteJob streams a job with it, run_agent takes a one-shot mode's
answer, sync_node the sync mode's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from ..nodeagent import AGENT_MARK, DATA, EVENT, HEARTBEAT
from ..transports.base import Process

# Frames are plain slotted dataclasses, not frozen ones: one is made per frame on the
# streaming hot path, and a frozen dataclass's __init__ costs about twice as much.
_DATA = DATA + b" "
_EVENT = EVENT + b" "


@dataclass(slots=True)
class DataFrame:
    """Whole lines of one output file on the node (nodeagent.LAUNCHER_KEY, or a local rank)."""
    key: str
    chunk: bytes


@dataclass(slots=True)
class EventFrame:
    """An event (nodeagent.Event names it) and its fields (without "event")."""
    name: str
    fields: dict[str, Any]

    def report(self) -> dict[str, Any]:
        """The event as the agent sent it: its fields and "event"."""
        return {**self.fields, "event": self.name}


@dataclass(slots=True)
class Heartbeat:
    """The agent is alive; nothing else to say."""


@dataclass(slots=True)
class Stray:
    """A line that is not the agent's (it writes only frames): a login that printed late."""
    line: bytes


@dataclass(slots=True)
class Broken:
    """The stream ended: EOF, or a data frame cut short."""


Frame = Union[DataFrame, EventFrame, Heartbeat, Stray, Broken]
_HEARTBEAT = Heartbeat()
_BROKEN = Broken()


def agent_mark(token: str) -> bytes:
    """The agent's first line in a session started with this token."""
    return AGENT_MARK + token.encode() + b"\n"


def read_preamble(proc: Process, mark: bytes) -> tuple[bool, bytes]:
    """Read up to the agent's first line: (whether the agent spoke, the login's output
    before it). The agent starts with a newline of its own, which ends a login line
    left open; it is not part of the login's output."""
    seen: list[bytes] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            return False, b"".join(seen)
        if line.endswith(mark):
            seen.append(line[:-len(mark)])
            login = b"".join(seen)
            return True, login[:-1] if login.endswith(b"\n") else login
        seen.append(line)


class FrameReader:
    """The frames from an agent's stdout, after its preamble, one at a time."""

    def __init__(self, proc: Process) -> None:
        self._readline = proc.stdout.readline
        self._read = proc.stdout.read

    def next(self) -> Frame:
        header = self._readline()
        if header[:2] == _DATA:
            _, key, n = header.split(b" ")
            size = int(n)
            chunk = self._read(size)
            if len(chunk) < size:
                return _BROKEN
            return DataFrame(key.decode(), chunk)
        if header == HEARTBEAT:
            return _HEARTBEAT
        if header[:2] == _EVENT:
            fields = json.loads(header[2:])
            return EventFrame(fields.pop("event"), fields)
        if header:
            return Stray(header)
        return _BROKEN

    def next_event(self) -> EventFrame | None:
        """The next event, past anything else; None if the stream ends first."""
        while True:
            frame = self.next()
            if isinstance(frame, EventFrame):
                return frame
            if isinstance(frame, Broken):
                return None
