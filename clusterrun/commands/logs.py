"""`clusterrun logs`: a run's lines, tagged, from its per-rank logs; -f follows it live."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..run.controller import collect
from ..errors import EXIT_INTERRUPTED, UsageError
from ..options import WatchOptions
from ..plan import NodePlan, Plan
from ..run.records import AttemptRecord
from ..run.runs import RunDir
from ..run.stream import Terminal, shown_lines, tag_for, tag_lines

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


def logs(run_id: str | None, ranks: tuple[int, ...], node: str | None, follow: bool,
         tail: int | None, opts: WatchOptions, attempt: int | None = None) -> int:
    run = RunDir.find(run_id)
    plan = run.plan()
    files = select(run, plan, ranks, node)
    term = Terminal()
    records = run.attempts()
    if attempt is not None and not 0 <= attempt < max(1, len(records)):
        raise UsageError(f"run {plan.run_id} has attempts 0-{max(1, len(records)) - 1}, not {attempt}")
    if not follow:
        if not run.ended():         # bring the logs up to date if nobody else is
            collect(run, Terminal(), opts.quiet(), follow=False)
        records = run.attempts()
        if attempt is not None and records:
            _print_attempt(term, files, records, attempt, tail, marker=False)
        else:
            _show_so_far(term, files, records, tail)
        return 0
    wanted = {(f.node.node_rank, f.key) for f in files}
    shown = [0] * len(files)     # bytes of each file printed so far
    seen = [0]                   # attempts whose lines have begun to show

    def show_existing() -> None:
        records = run.attempts()
        shown[:] = _show_so_far(term, files, records, tail)
        seen[0] = len(records)

    # Following is watching: Ctrl-C stops following, never the run; the run's own
    # summary is `up`'s and `status`'s to give.
    follow_opts = replace(opts, print_lines=True, report=False, interrupt_stops_run=False,
                          show=lambda n, key: (n.node_rank, key) in wanted)
    code = collect(run, term, follow_opts, follow=True, before=show_existing)
    if code == EXIT_INTERRUPTED:
        return code
    if code is not None:
        return 0
    # Another process is collecting this run (and may restart it): follow its files
    # until the run ends, with a marker where each new attempt begins.
    show_existing()
    while True:
        ended = run.ended()
        records = run.attempts()    # read before the files: an attempt is recorded before its lines land
        for k in range(max(seen[0], 1), len(records)):
            shown[:] = _print_slices(term, files, shown, records[k - 1], records[k].starts)
            term.write(_marker(k))
        seen[0] = len(records)
        shown[:] = _print_slices(term, files, shown, records[-1] if records else None, {})
        if ended:
            return 0
        time.sleep(POLL)


def _marker(k: int) -> bytes:
    return f"--- attempt {k} ---\n".encode()


def _show_so_far(term: Terminal, files: list[LogFile], records: list[AttemptRecord], tail: int | None) -> list[int]:
    """What the logs hold now, each attempt under its marker where the run may restart;
    returns where each file's lines end."""
    if not records or (len(records) == 1 and not records[0].max_restarts):
        return [_print_file(term, f, 0, tail) for f in files]
    return [_print_attempt(term, files, records, k, tail, marker=True) for k in range(len(records))][-1]


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


def _print_attempt(term: Terminal, files: list[LogFile], records: list[AttemptRecord], k: int,
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


