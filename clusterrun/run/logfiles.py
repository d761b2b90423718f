"""A run's log files as `logs` shows them: which files, tagged how, attempt by attempt;
and following them while another process collects the run (`logs -f`, and the `up`
that submitted a run to Slurm, whose batch step collects it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..plan import NodePlan, Plan
from .records import AttemptRecord
from .runs import RunDir
from .stream import Terminal, shown_lines, tag_for, tag_lines

POLL = 0.2


@dataclass(frozen=True)
class LogFile:
    node: NodePlan
    key: str            # "L" (torchrun's lines) or a local rank
    path: Path
    tag: bytes


def select(run: RunDir, plan: Plan, ranks: tuple[int, ...], node: str | None) -> list[LogFile]:
    """The files to show: the given ranks, or one node, or everything."""
    for r in ranks:
        if not 0 <= r < plan.world_size:
            raise UsageError(f"run {plan.run_id} has ranks 0-{plan.world_size - 1}, not {r}")
    nodes = plan.nodes
    if node is not None:
        nodes = tuple(n for n in plan.nodes if node in (n.name, n.host.host, str(n.node_rank)))
        if not nodes:
            names = ", ".join(n.name for n in plan.nodes)
            raise UsageError(f"run {plan.run_id} has no node {node!r} (nodes: {names})")
    files = []
    for n in nodes:
        if not ranks:
            files.append(LogFile(n, "L", run.node_log(n.node_rank), tag_for(n.name)))
        for g in n.ranks:
            if not ranks or g in ranks:
                local = g - n.rank_start
                files.append(LogFile(n, str(local), run.rank_log(g), tag_for(f"{n.name} g{g} l{local}")))
    return files


class Follower:
    """Follows a run's files while another process collects it (and may restart it):
    what they hold, then each new whole line, with a marker where each new attempt
    begins. `follow` may be called again after an interrupt: it goes on where it stopped."""

    def __init__(self, run: RunDir, files: list[LogFile], term: Terminal, tail: int | None) -> None:
        self.run, self.files, self.term, self.tail = run, files, term, tail
        self.shown: list[int] | None = None     # bytes of each file printed so far
        self.seen = 0                           # attempts whose lines have begun to show

    def follow(self, done: Callable[[], bool], tick: Callable[[], None] | None = None) -> None:
        """Until done() was true before a last look. `tick`: called on every look, after the files."""
        if self.shown is None:
            records = self.run.attempts()
            self.shown = show_so_far(self.term, self.files, records, self.tail)
            self.seen = len(records)
        while True:
            ended = done()
            records = self.run.attempts()   # read before the files: an attempt is recorded before its lines land
            for k in range(max(self.seen, 1), len(records)):
                self.shown = _print_slices(self.term, self.files, self.shown, records[k - 1], records[k].starts)
                self.term.write(_marker(k))
            self.seen = len(records)
            self.shown = _print_slices(self.term, self.files, self.shown, records[-1] if records else None, {})
            if tick is not None:
                tick()
            if ended:
                return
            time.sleep(POLL)


def _marker(k: int) -> bytes:
    return f"--- attempt {k} ---\n".encode()


def show_so_far(term: Terminal, files: list[LogFile], records: list[AttemptRecord], tail: int | None) -> list[int]:
    """What the logs hold now, each attempt under its marker where the run may restart;
    returns where each file's lines end."""
    if not records or (len(records) == 1 and not records[0].max_restarts):
        return [_print_file(term, f, 0, tail) for f in files]
    return [print_attempt(term, files, records, k, tail, marker=True) for k in range(len(records))][-1]


def _print_slices(term: Terminal, files: list[LogFile], shown: list[int], record: AttemptRecord | None,
                  stops: dict[str, int]) -> list[int]:
    """Each file's new whole lines (up to its `stops` offset), tagged as in `record`'s attempt."""
    return [_print_file(term, _as_in(f, record), shown[i], None, stops.get(f.path.name))
            for i, f in enumerate(files)]


def _as_in(f: LogFile, record: AttemptRecord | None) -> LogFile:
    """f tagged with the name its node had in an attempt (a spare may have taken its place)."""
    name = record.nodes[f.node.node_rank] if record else f.node.name
    if name == f.node.name:
        return f
    return replace(f, tag=f.tag.replace(f"[{f.node.name}".encode(), f"[{name}".encode(), 1))


def print_attempt(term: Terminal, files: list[LogFile], records: list[AttemptRecord], k: int,
                   tail: int | None, marker: bool) -> list[int]:
    """Attempt k's slice of every file (after a restart the logs hold every attempt),
    tagged with the node names of that attempt; returns where each slice's lines end."""
    if marker:
        term.write(_marker(k))
    begin = records[k].starts
    end = records[k + 1].starts if k + 1 < len(records) else {}
    return [_print_file(term, _as_in(f, records[k]), begin.get(f.path.name, 0), tail, end.get(f.path.name))
            for f in files]


def _print_file(term: Terminal, f: LogFile, start: int, tail: int | None, stop: int | None = None) -> int:
    """Print the whole lines of f from byte `start` (to `stop`); returns where they end."""
    try:
        with open(f.path, "rb") as fh:
            fh.seek(start)
            data = fh.read() if stop is None else fh.read(max(0, stop - start))
    except FileNotFoundError:
        return start
    end = data.rfind(b"\n") + 1
    if not end:
        return start
    data = shown_lines(data[:end])
    if tail is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
    if data:
        term.write(tag_lines(f.tag, data))
    return start + end


