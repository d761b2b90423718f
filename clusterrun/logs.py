"""`clusterrun logs`: a run's lines, tagged, from its per-rank logs; -f follows it live."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from .controller import collect
from .errors import EXIT_INTERRUPTED, UsageError
from .options import WatchOptions
from .plan import NodePlan, Plan
from .runs import RunDir
from .stream import Terminal, tag_for, tag_lines

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
        if len(records) <= 1:
            for f in files:
                _print_file(term, f, 0, tail)
            return 0
        for k in range(len(records)) if attempt is None else (attempt,):
            _print_attempt(term, files, records, k, tail, marker=attempt is None)
        return 0
    wanted = {(f.node.node_rank, f.key) for f in files}
    shown = [0] * len(files)     # bytes of each file printed so far

    def show_existing() -> None:
        for i, f in enumerate(files):
            shown[i] = _print_file(term, f, 0, tail)

    # Following is watching: Ctrl-C stops following, never the run; the run's own
    # summary is `up`'s and `status`'s to give.
    follow_opts = replace(opts, print_lines=True, report=False, interrupt_stops_run=False,
                          show=lambda n, key: (n.node_rank, key) in wanted)
    code = collect(run, term, follow_opts, follow=True, before=show_existing)
    if code == EXIT_INTERRUPTED:
        return code
    if code is not None:
        return 0
    # Another process is collecting this run: follow its files until the run ends.
    show_existing()
    while True:
        ended = run.ended()
        for i, f in enumerate(files):
            shown[i] = _print_file(term, f, shown[i], None)
        if ended:
            return 0
        time.sleep(POLL)


def _print_attempt(term: Terminal, files: list[LogFile], records: list[dict], k: int,
                   tail: int | None, marker: bool) -> None:
    """Attempt k's slice of every file (after a restart the logs hold every attempt),
    tagged with the node names of that attempt (a spare may have taken a node's place)."""
    if marker:
        term.write(f"--- attempt {k} ---\n".encode())
    begin = records[k]["starts"]
    end = records[k + 1]["starts"] if k + 1 < len(records) else {}
    names = records[k]["nodes"]
    for f in files:
        tag = f.tag.replace(f"[{f.node.name}".encode(), f"[{names[f.node.node_rank]}".encode(), 1)
        _print_file(term, replace(f, tag=tag), begin.get(f.path.name, 0), tail, end.get(f.path.name))


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
    data = data[:end]
    if tail is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
    if data:
        term.write(tag_lines(f.tag, data))
    return start + end


