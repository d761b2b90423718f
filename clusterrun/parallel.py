"""One way to do a thing on every node in parallel: a bounded window of threads,
one result or error per node, in the nodes' order (ClusterShell's fanout, fabric's
GroupResult)."""

from __future__ import annotations

import threading
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


def each(items: Sequence[I], fn: Callable[[I], T], window: int = WINDOW) -> list[Outcome[T]]:
    """fn(item) for every item, at most `window` at a time; an Outcome per item, in order.

    The threads are daemons: a Ctrl-C in the caller is not held up by a node that
    does not answer (the caller then tears things down its own way)."""
    out: list[Outcome[T]] = [Outcome() for _ in items]
    gate = threading.BoundedSemaphore(max(1, window))

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
    for t in threads:
        t.join()
    return out
