"""Results: every node's outcome, the summary a user reads, and one exit code."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Sequence

from ..errors import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK
from ..model import NodeResult, NodeState, RankFailure
from ..plan import NodePlan
from .runs import RunDir
from .stream import shown_lines

TAIL = 10   # last lines shown per failing rank


def describe_code(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code > 128:
        try:
            return f"exited with code {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exited with code {code}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_ranks(ranks: Sequence[int]) -> str:
    """`rank 2`, `ranks 2-5`, or `ranks 0, 3` (sorted)."""
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


_STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGKILL)


def _by_itself(f: RankFailure) -> bool:
    """Failed on its own, whatever signal ended it: OOM-killed, or its script had raised an
    exception (its traceback is in its log) before anything stopped it."""
    return f.oom or bool(f.raised) or f.exitcode not in _STOP_SIGNALS


def _by_torchrun(f: RankFailure, node_failures: Sequence[RankFailure]) -> bool:
    """Ended by its own node's torchrun, which stops the other local workers when one
    fails (a rank that failed by itself first is not one of those)."""
    return not _by_itself(f) and any(
        o is not f and not o.stopped and _by_itself(o)
        and (o.exit_time or 0) <= (f.exit_time or 0) for o in node_failures)


def summary(results: Sequence[NodeResult], run: RunDir, tail: int = TAIL) -> list[str]:
    """What went wrong, from the facts each node recorded: every rank that failed on its
    own, in the order they ended (each with its last lines), then nodes that failed as a
    whole, then what was stopped, and by whom. Nothing is called stopped unless it was."""
    own: list[tuple[RankFailure, NodePlan]] = []
    collateral: list[tuple[RankFailure, NodePlan]] = []
    whole: list[NodeResult] = []
    for r in results:
        if r.ok or r.state == NodeState.KILLED:
            continue
        for f in r.failures:
            if not f.stopped:
                (collateral if _by_torchrun(f, r.failures) else own).append((f, r.node))
        if not r.failures and not r.stopped:
            whole.append(r)
    own.sort(key=lambda fn: (fn[0].exit_time is None, fn[0].exit_time or 0))
    first = f"rank {own[0][0].rank}" if own else (f"node {whole[0].node.name}" if whole else None)
    if whole and own and results.index(whole[0]) < min(results.index(_result(results, n)) for _, n in own):
        first = f"node {whole[0].node.name}"     # a node that failed before any rank did
    lines: list[str] = []
    for f, node in own:
        what = describe_code(f.exitcode) if f.exitcode is not None else "exited (its code was not recorded)"
        if f.oom:
            what += ": out of memory (the node's kernel OOM killer ended it)"
        elif f.raised and f.exitcode is not None and f.exitcode < 0:
            what = f"raised {f.raised}, then {what} while it exited"
        elif f.finished and f.exitcode is not None and f.exitcode < 0:
            what += " after its script had finished, while Python shut down: its work was done"
        lines.append(f"clusterrun: rank {f.rank} ({node.name}, local rank {f.local_rank}) {what}")
        lines += [f"  | {t}" for t in _attempt_tail(run, run.rank_log(f.rank), tail)]
    for r in whole:
        node = r.node
        if r.state == NodeState.EXITED:
            what = f"torchrun {describe_code(r.code if r.code is not None else -1)}"
        elif r.state == NodeState.FAILED_TO_START:
            what = f"could not start: {r.message}"
        else:
            what = f"was lost: {r.message}"
            if r.message.startswith(("unreachable", "the connection")):     # not "the job's processes are gone"
                what += f" (its job may still run there: `clusterrun kill {run.run_id}` ends it once the node answers)"
        lines.append(f"clusterrun: node {node.name} (node_rank {node.node_rank}) {what}")
        lines += [f"  | {t}" for t in _attempt_tail(run, run.node_log(node.node_rank), tail)]
    after = f" after {first} failed" if first else ""
    for f, node in collateral:
        assert f.exitcode is not None       # _by_torchrun: it ended by one of the stop signals
        lines.append(f"clusterrun: rank {f.rank} ({node.name}, local rank {f.local_rank}) was stopped "
                     f"({signal.Signals(-f.exitcode).name}){after}")
    for r in results:
        if r.state == NodeState.KILLED and not r.ok:
            why = f" ({r.message})" if r.message else ""
            lines.append(f"clusterrun: node {r.node.name} ({describe_ranks(r.node.ranks)}) was killed{why}")
        elif r.stopped and not r.ok:
            failed_first = {f.rank for f in r.failures if not f.stopped}
            ranks = [g for g in r.node.ranks if g not in failed_first]
            if ranks:
                lines.append(f"clusterrun: node {r.node.name} ({describe_ranks(ranks)}) was stopped{after}")
    return lines


def _result(results: Sequence[NodeResult], node: NodePlan) -> NodeResult:
    return next(r for r in results if r.node is node)


def exit_code(results: Sequence[NodeResult], interrupted: bool) -> int:
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(r.ok for r in results) else EXIT_JOB_FAILED


def _attempt_tail(run: RunDir, path: Path, n: int) -> list[str]:
    """The last n lines of a log that the run's last attempt wrote (after a restart, a log
    holds every attempt's lines: an earlier attempt's are not this failure's)."""
    return tail_lines(path, n, run.attempt_starts().get(path.name, 0))


def tail_lines(path: Path, n: int, start: int = 0) -> list[str]:
    """The last n lines of a log after byte `start`, read from its end, as a terminal leaves
    them (a progress bar's line is its last redraw, so its redraws are not n lines)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    end = data.rfind(b"\n") + 1
    data = shown_lines(data[:end]) + data[end:].rsplit(b"\r", 1)[-1]
    return data.decode("utf-8", "replace").splitlines()[-n:]
