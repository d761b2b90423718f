"""One way to do a thing on every node in parallel: a bounded window of threads,
one result or error per node, in the nodes' order (ClusterShell's fanout, fabric's
GroupResult)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

WINDOW = 64         # at most this many calls at once (sshd's MaxStartups, open files)

I = TypeVar("I")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one call returned, or the exception it raised."""

    value: T | None = None
    error: Exception | None = None


class TimedOut(Exception):
    """The call had not returned when `each`'s time limit was reached (it may still run)."""


def each(items: Sequence[I], fn: Callable[[I], T], window: int = WINDOW, timeout: float | None = None,
         tick: Callable[[list[int], float], None] | None = None) -> list[Outcome[T]]:
    """fn(item) for every item, at most `window` at a time; an Outcome per item, in order.

    The threads are daemons: a Ctrl-C in the caller is not held up by a node that
    does not answer (the caller then tears things down its own way). timeout: after
    this many seconds the calls not yet returned get TimedOut as their outcome (they
    go on in their threads: the caller ends them its own way). tick(pending indices,
    seconds so far): called about every second while calls are pending."""
    out: list[Outcome[T]] = [Outcome() for _ in items]
    gate = threading.BoundedSemaphore(max(1, window))
    began = time.monotonic()

    def run(i: int, item: I) -> None:
        try:
            out[i] = Outcome(value=fn(item))
        except Exception as e:  # noqa: BLE001 - every node's error is its own result
            out[i] = Outcome(error=e)
        finally:
            gate.release()

    threads = []
    for i, item in enumerate(items):
        gate.acquire()
        t = threading.Thread(target=run, args=(i, item), daemon=True)
        t.start()
        threads.append(t)
    if timeout is None and tick is None:
        for t in threads:
            t.join()
        return out
    while True:
        pending = [i for i, t in enumerate(threads) if t.is_alive()]
        elapsed = time.monotonic() - began
        if not pending:
            return out
        if timeout is not None and elapsed >= timeout:
            break
        if tick is not None:
            tick(pending, elapsed)
        threads[pending[0]].join(min(1.0, timeout - elapsed) if timeout is not None else 1.0)
    snapshot = list(out)
    for i in pending:
        if not threads[i].is_alive():       # it returned just now
            continue
        snapshot[i] = Outcome(error=TimedOut(f"not done after {elapsed:.0f}s"))
    return snapshot
