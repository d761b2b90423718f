"""Results: every node's outcome, the summary a user reads, and one exit code."""

from __future__ import annotations

import signal
from typing import Sequence

from .errors import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK
from .model import NodeResult, NodeState
from .runs import RunDir, tail_lines

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


def summary(results: Sequence[NodeResult], run: RunDir, tail: int = TAIL) -> list[str]:
    """One line per failing rank, first failure first, each followed by its last lines.

    `results` is in the order the nodes finished, so the first failing node
    comes first; torchrun lists a node's root-cause rank first.
    """
    lines: list[str] = []
    first: str | None = None
    for r in results:
        if r.ok or r.stopped:
            continue
        node = r.node
        if r.failures:
            for f in r.failures:
                what = describe_code(f.exitcode)
                if first and f.exitcode in (-signal.SIGTERM, -signal.SIGKILL):
                    what = f"was stopped ({signal.Signals(-f.exitcode).name}) after {first} failed"
                lines.append(f"clusterrun: rank {f.rank} ({node.name}, local rank {f.local_rank}) {what}")
                lines += [f"  | {t}" for t in tail_lines(run.rank_log(f.rank), tail)]
                first = first or f"rank {f.rank}"
            continue
        if r.state == NodeState.EXITED:
            what = f"torchrun {describe_code(r.code if r.code is not None else -1)}"
        elif r.state == NodeState.FAILED_TO_START:
            what = f"could not start: {r.message}"
        else:
            what = f"was lost: {r.message}"
        lines.append(f"clusterrun: node {node.name} (node_rank {node.node_rank}) {what}")
        lines += [f"  | {t}" for t in tail_lines(run.node_log(node.node_rank), tail)]
        first = first or f"node {node.name}"
    for r in results:
        if r.stopped and not r.ok:
            if r.state == NodeState.KILLED:
                why = f" ({r.message})" if r.message else ""
            else:
                why = f" after {first} failed" if first else ""
            lines.append(f"clusterrun: node {r.node.name} (ranks {r.node.ranks.start}-"
                         f"{r.node.ranks.stop - 1}) was {'killed' if r.state == NodeState.KILLED else 'stopped'}{why}")
    return lines


def exit_code(results: Sequence[NodeResult], interrupted: bool) -> int:
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(r.ok for r in results) else EXIT_JOB_FAILED
