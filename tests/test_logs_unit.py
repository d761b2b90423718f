"""`clusterrun logs` over a run's files: attempts, markers and spares' names, without a cluster
(the end-to-end tests are in test_restart_e2e.py and test_lifecycle_e2e.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from conftest import UNIT_RUN_ID

from clusterrun.commands import logs
from clusterrun.options import WatchOptions


def _attempt(plan, k: int, spare: str | None = None):
    """Attempt k's plan; a spare, if given, has taken nodeX's place."""
    x = plan.nodes[1]
    nodes = plan.nodes if spare is None else (plan.nodes[0], replace(x, host=replace(x.host, name=spare)))
    return replace(plan, attempt=k, nodes=nodes)


def _collected(capsysbinary, want: bytes, timeout: float = 10.0) -> bytes:
    """What logs -f printed, once it holds `want` (bounded: a failure shows what came)."""
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        got += capsysbinary.readouterr().out
        time.sleep(0.05)
    return got


def test_following_a_run_that_another_process_restarts_marks_each_attempt(plan, run, capsysbinary):
    run.write_plan(plan)
    run.start_attempt(plan, 2, {})
    log = run.rank_log(4)
    log.write_bytes(b"a0 first\n")
    codes: list[int] = []
    with run.lock():            # the run's collector is another process (up, or up -d's)
        t = threading.Thread(target=lambda: codes.append(
            logs.logs(UNIT_RUN_ID, (4,), None, True, None, WatchOptions())))
        t.start()
        try:
            out = _collected(capsysbinary, b"a0 first")
            with open(log, "ab") as f:
                f.write(b"a0 second\n")
            run.start_attempt(_attempt(plan, 1, spare="nodeS"), 2, {"nodeS": "nodeX"})
            with open(log, "ab") as f:
                f.write(b"a1 first\nhalf a li")
        finally:
            run.write_json("result.json", {})      # the run ended: logs -f returns
            t.join(10)
    out += capsysbinary.readouterr().out
    assert not t.is_alive() and codes == [0]
    whole = (b"--- attempt 0 ---\n[nodeX g4 l1] a0 first\n[nodeX g4 l1] a0 second\n"
             b"--- attempt 1 ---\n[nodeS g4 l1] a1 first\n")
    assert out == whole

    # Afterwards, the same without -f; one attempt alone with --attempt.
    assert logs.logs(UNIT_RUN_ID, (4,), None, False, None, WatchOptions()) == 0
    assert capsysbinary.readouterr().out == whole
    logs.logs(UNIT_RUN_ID, (4,), None, False, None, WatchOptions(), attempt=1)
    assert capsysbinary.readouterr().out == b"[nodeS g4 l1] a1 first\n"


def test_a_run_without_restarts_shows_no_marker(plan, run, capsysbinary):
    run.write_plan(plan)
    run.start_attempt(plan, 0, {})
    run.rank_log(3).write_bytes(b"only\n")
    run.write_json("result.json", {})
    logs.logs(UNIT_RUN_ID, (3,), None, True, None, WatchOptions())
    logs.logs(UNIT_RUN_ID, (3,), None, False, None, WatchOptions())
    assert capsysbinary.readouterr().out == b"[nodeX g3 l0] only\n" * 2


def test_a_progress_bar_in_a_log_shows_as_its_last_redraw_and_counts_as_one_line(plan, run, capsysbinary):
    run.write_plan(plan)
    run.rank_log(3).write_bytes(b"epoch 1\n\r 50%|##  |\r100%|####|\nloss 0.5\n\r 10%|")    # a bar going on
    run.write_json("result.json", {})
    logs.logs(UNIT_RUN_ID, (3,), None, False, None, WatchOptions())
    assert capsysbinary.readouterr().out == (b"[nodeX g3 l0] epoch 1\n[nodeX g3 l0] 100%|####|\n"
                                             b"[nodeX g3 l0] loss 0.5\n")
    logs.logs(UNIT_RUN_ID, (3,), None, False, 2, WatchOptions())
    assert capsysbinary.readouterr().out == b"[nodeX g3 l0] 100%|####|\n[nodeX g3 l0] loss 0.5\n"
