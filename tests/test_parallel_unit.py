"""Unit: parallel.each, the one way to do a thing on every node."""

from __future__ import annotations

import threading
import time

from clusterrun.parallel import TimedOut, each


def test_results_and_errors_come_back_per_item_in_order():
    def fn(i: int) -> int:
        if i % 3 == 0:
            raise ValueError(f"node {i}")
        return i * 10

    out = each(range(7), fn)
    assert [o.value for o in out] == [None, 10, 20, None, 40, 50, None]
    assert [str(o.error) if o.error else None for o in out] == ["node 0", None, None, "node 3", None,
                                                                None, "node 6"]


def test_no_more_than_the_window_run_at_once():
    lock, running, peak = threading.Lock(), [0], [0]
    go = threading.Event()

    def fn(_: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        go.wait(30)                 # every call blocks until the test lets go
        with lock:
            running[0] -= 1

    t = threading.Thread(target=each, args=(range(40), fn), kwargs={"window": 5})
    t.start()
    deadline = time.monotonic() + 30
    while running[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)                 # a sixth call, if the window let one through, would show now
    assert running[0] == 5 and peak[0] == 5
    go.set()
    t.join(30)
    assert peak[0] == 5 and running[0] == 0


def test_a_call_not_done_by_the_timeout_is_timed_out_and_the_others_come_back():
    release = threading.Event()
    ticks: list[list[int]] = []

    def fn(i: int) -> int:
        if i == 1:
            release.wait()          # a node whose setup never ends
        return i

    out = each(range(3), fn, timeout=0.3, tick=lambda pending, _: ticks.append(pending))
    release.set()
    assert [o.value for o in out] == [0, None, 2]
    assert isinstance(out[1].error, TimedOut)
    assert ticks and all(p == [1] for p in ticks[1:])   # the progress names the one still pending
