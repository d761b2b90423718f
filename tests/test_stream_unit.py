"""What reaches the user: tagged lines on the terminal, raw per-rank logs, the failure summary.

`[node2 g5 l1] loss 0.123` for a worker line, `[node2] ...` for torchrun's own;
logs under $CLUSTERRUN_HOME/runs/<id>/logs, private to the user.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from clusterrun import nodeagent
from clusterrun.errors import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK
from clusterrun.hostsfile import parse_hosts
from clusterrun.options import LaunchOptions
from clusterrun.plan import make_plan
from clusterrun.model import NodeResult, RankFailure
from clusterrun.run.results import exit_code, summary
from clusterrun.run.runs import RunDir
from clusterrun.run.stream import NodeOutput, use_color
from fakenode import Screen

RUN_ID = "20260101-000000-abc123"
ANSI = re.compile(rb"\x1b\[[0-9;]*m")


@pytest.fixture()
def screen() -> Screen:
    return Screen()


def output(plan, run, screen, node_rank=1, color=False) -> NodeOutput:
    return NodeOutput(plan.nodes[node_rank], run, screen.term, color)


_KEYS: dict[int, str] = {}


def key(local_rank: int) -> str:
    """The key the node agent gives local rank N's output file: asked of the agent itself,
    from torchrun's log layout (<log-dir>/<rdzv>_<rand>/attempt_0/<local rank>/stdout.log),
    so these tests break if the agent and NodeOutput ever disagree."""
    if local_rank not in _KEYS:
        with tempfile.TemporaryDirectory() as job_dir:
            d = Path(job_dir, "torchrun", f"{RUN_ID}_x1y2", "attempt_0", str(local_rank))
            d.mkdir(parents=True)
            (d / "stdout.log").write_bytes(b"")
            sources: dict = {}
            nodeagent.discover(job_dir, sources, {})
            for src in sources.values():
                os.close(src.fd)
            (_KEYS[local_rank],) = sources
    return _KEYS[local_rank]


# --- tagged lines ----------------------------------------------------------------------------


def test_worker_lines_are_tagged_with_node_global_and_local_rank(plan, run, screen):
    out = output(plan, run, screen)
    out.data(key(1), b"a\nb\n")
    out.close()
    assert screen.text == b"[nodeX g4 l1] a\n[nodeX g4 l1] b\n"
    assert run.rank_log(4).read_bytes() == b"a\nb\n", "the rank's log gets the raw lines"


def test_global_rank_is_rank_start_plus_local_rank(plan, run, screen):
    w, x = output(plan, run, screen, 0), output(plan, run, screen, 1)
    w.data(key(2), b"w2\n")
    x.data(key(0), b"x0\n")
    w.close(), x.close()
    assert screen.text == b"[nodeW g2 l2] w2\n[nodeX g3 l0] x0\n"
    assert run.rank_log(2).read_bytes() == b"w2\n" and run.rank_log(3).read_bytes() == b"x0\n"


def test_launcher_lines_are_tagged_with_the_node_only_and_go_to_the_node_log(plan, run, screen):
    out = output(plan, run, screen)
    out.data("L", b"W1126 torchrun warning\n")
    out.close()
    assert screen.text == b"[nodeX] W1126 torchrun warning\n"
    assert run.node_log(1).read_bytes() == b"W1126 torchrun warning\n"
    assert not run.rank_log(3).exists() and not run.rank_log(4).exists()


def test_chunks_append_in_order_and_received_counts_bytes_per_file(plan, run, screen):
    out = output(plan, run, screen)
    out.data(key(1), b"one\n")
    out.data("L", b"launcher\n")
    out.data(key(1), b"two\nthree\n")
    out.close()
    assert out.received == {key(1): 14, "L": 9}
    assert run.rank_log(4).read_bytes() == b"one\ntwo\nthree\n"
    assert screen.text.splitlines() == [b"[nodeX g4 l1] one", b"[nodeX] launcher",
                                        b"[nodeX g4 l1] two", b"[nodeX g4 l1] three"]


def test_a_new_collector_resumes_where_the_local_logs_end(plan, run, screen):
    """After a reconnect (or a new `logs -f`), nothing is fetched twice and nothing is skipped."""
    first = output(plan, run, screen)
    first.data(key(1), b"one\ntwo\n")
    first.data("L", b"launcher\n")
    first.close()
    again = output(plan, run, screen)
    assert again.received == {key(1): 8, "L": 9}
    again.data(key(1), b"three\n")
    again.close()
    assert run.rank_log(4).read_bytes() == b"one\ntwo\nthree\n"


def test_bytes_are_passed_through_untouched(plan, run, screen):
    out = output(plan, run, screen)
    payload = b"\xff\xfe not utf-8\r progress 50%\r100%\n  indented\t\n\ncrlf\r\n"
    out.data(key(0), payload)
    out.close()
    assert run.rank_log(3).read_bytes() == payload, "the log keeps every byte"
    # The terminal shows a redrawn line as a terminal leaves it: its last redraw.
    assert screen.text == b"[nodeX g3 l0] 100%\n[nodeX g3 l0]   indented\t\n[nodeX g3 l0] \n[nodeX g3 l0] crlf\n"


# --- progress bars (carriage returns) --------------------------------------------------------


class TtyErr(io.StringIO):
    def isatty(self) -> bool:
        return True


def tqdm_like(out: NodeOutput, local: int, steps: int) -> None:
    """The chunks the agent passes on for a bar: each redraw at once, then its newline."""
    for i in range(steps + 1):
        out.data(key(local), b"\r%3d%%|%s%s|" % (100 * i // steps, b"#" * i, b" " * (steps - i)))
    out.data(key(local), b"\n")


def test_a_progress_bar_shows_its_last_redraw_once_it_ends_and_its_log_keeps_every_byte(plan, run, screen):
    out = output(plan, run, screen)
    out.data(key(0), b"epoch 1\n")
    before = out.line_at["0"]
    tqdm_like(out, 0, 4)
    out.data(key(0), b"loss 0.5\n")
    out.close()
    assert screen.text == b"[nodeX g3 l0] epoch 1\n[nodeX g3 l0] 100%|####|\n[nodeX g3 l0] loss 0.5\n"
    assert run.rank_log(3).read_bytes() == (b"epoch 1\n\r  0%|    |\r 25%|#   |\r 50%|##  |\r 75%|### |"
                                            b"\r100%|####|\nloss 0.5\n")
    assert out.line_at["0"] > before, "a redraw is a sign of life for the hang watch"
    assert screen.messages == [], "not a terminal: no progress line"


def test_on_a_terminal_the_bar_is_the_progress_line_and_one_rank_keeps_it(plan, run):
    err = TtyErr()
    screen_out = io.BytesIO()
    from clusterrun.run.stream import Terminal
    out = NodeOutput(plan.nodes[1], run, Terminal(screen_out, err), False)
    out.data(key(0), b"\r 10%|#")
    assert err.getvalue().endswith("\r\x1b[K[nodeX g3 l0]  10%|#")
    out.data(key(1), b"\r 90%|#########")       # another rank's bar: the first keeps the line
    assert "90%" not in err.getvalue()
    out.data(key(0), b"\r 20%|##")
    assert err.getvalue().endswith("\r\x1b[K[nodeX g3 l0]  20%|##")
    out.data(key(0), b" done\n")                 # the first bar ends: its line is printed whole
    assert screen_out.getvalue() == b"[nodeX g3 l0]  20%|## done\n"
    out.data(key(1), b"\r 95%|#########")
    assert err.getvalue().endswith("\r\x1b[K[nodeX g4 l1]  95%|#########")
    out.close()


def test_lines_before_a_bar_in_the_same_chunk_are_printed_before_the_bar_is_drawn(plan, run):
    class Both(io.StringIO):        # stdout and stderr on one terminal, in the order written
        def isatty(self) -> bool:
            return True

    screen_both = Both()

    class Out:
        def write(self, data: bytes) -> None:
            screen_both.write(data.decode())

        def flush(self) -> None:
            pass

    from clusterrun.run.stream import Terminal
    out = NodeOutput(plan.nodes[1], run, Terminal(Out(), screen_both), False)   # type: ignore[arg-type]
    out.data(key(0), b"line A\n\r  0%|")
    assert screen_both.getvalue() == "[nodeX g3 l0] line A\n\r\x1b[K[nodeX g3 l0]   0%|"
    out.close()


def test_the_progress_line_fits_the_terminal_and_carries_no_escape_codes(plan, run):
    err = TtyErr()                   # no size to ask for: 80 columns
    from clusterrun.run.stream import Terminal
    out = NodeOutput(plan.nodes[1], run, Terminal(io.BytesIO(), err), True)     # coloured tags
    out.data(key(0), b"\r\x1b[32m" + b"#" * 200)
    shown = err.getvalue().rsplit("\r\x1b[K", 1)[-1]
    assert shown == "[nodeX g3 l0] " + "#" * (79 - len("[nodeX g3 l0] "))
    out.close()


def test_a_runaway_line_is_shown_in_pieces_with_no_byte_lost(plan, run, screen):
    out = output(plan, run, screen)
    out.data(key(0), b"x" * 10)         # the agent passes on a line longer than LINE_MAX as is
    out.data(key(0), b"y" * 5 + b"\n")
    out.close()
    assert screen.text == b"[nodeX g3 l0] xxxxxxxxxx\n[nodeX g3 l0] yyyyy\n"
    assert run.rank_log(3).read_bytes() == b"x" * 10 + b"y" * 5 + b"\n"


def test_colour_wraps_the_tag_only_and_differs_per_node(plan, run, screen):
    w, x = output(plan, run, screen, 0, color=True), output(plan, run, screen, 1, color=True)
    w.data(key(0), b"hi\n")
    x.data(key(1), b"there\n")
    w.close(), x.close()
    lines = screen.text.splitlines()
    m = [re.fullmatch(rb"(\x1b\[\d+m)\[(.*?)\]\x1b\[0m (.*)", line) for line in lines]
    assert all(m), lines
    assert [(g.group(2), g.group(3)) for g in m] == [(b"nodeW g0 l0", b"hi"), (b"nodeX g4 l1", b"there")]
    assert m[0].group(1) != m[1].group(1), "each node's tag has its own colour"
    assert ANSI.sub(b"", screen.text) == b"[nodeW g0 l0] hi\n[nodeX g4 l1] there\n"
    assert run.rank_log(4).read_bytes() == b"there\n", "logs never get colour codes"


def test_no_colour_means_no_escape_codes(plan, run, screen):
    out = output(plan, run, screen, color=False)
    out.data(key(0), b"x\n")
    out.close()
    assert b"\x1b" not in screen.text


def test_colour_is_off_when_stdout_is_not_a_terminal_or_no_color_is_set(monkeypatch):
    class Tty(io.BytesIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(Tty()) is True
    assert use_color(io.BytesIO()) is False
    assert use_color(Tty(), no_color=True) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(Tty()) is False


def test_lines_from_many_nodes_never_splice_and_keep_their_order(home):
    hosts = parse_hosts([f"n{i}:2" for i in range(4)])
    plan = make_plan(hosts, LaunchOptions("t.py"), run_id=RUN_ID, master_addr="10.0.0.1", master_port=1,
                     controller_python="python3", local_home="/tmp/crh")
    run, screen = RunDir.create(RUN_ID), Screen()
    outputs = [NodeOutput(n, run, screen.term, False) for n in plan.nodes]

    def node(o: NodeOutput) -> None:
        for i in range(200):
            o.data(key(i % 2), b"".join(b"line %d.%d\n" % (i, j) for j in range(3)))

    threads = [threading.Thread(target=node, args=(o,)) for o in outputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outputs:
        o.close()
    per_rank: dict[bytes, list[bytes]] = {}
    for line in screen.text.splitlines():
        m = re.fullmatch(rb"\[(n\d g\d l\d)\] (line \d+\.\d)", line)
        assert m, line
        per_rank.setdefault(m.group(1), []).append(m.group(2))
    assert len(per_rank) == 8
    for tag, lines in per_rank.items():
        local = int(tag[-1:])
        expected = [b"line %d.%d" % (i, j) for i in range(local, 200, 2) for j in range(3)]
        assert lines == expected, tag


def test_messages_are_untagged_on_stderr(screen):
    screen.term.message("clusterrun: run x: 2 nodes")
    screen.term.progress("started 1/2 nodes")     # stderr is not a terminal: no progress line
    assert screen.err.getvalue() == "clusterrun: run x: 2 nodes\n"
    assert screen.text == b""


# --- the run directory -------------------------------------------------------------------------


def test_run_directory_and_logs_are_private(plan, run, screen, home):
    out = output(plan, run, screen)
    out.data(key(0), b"x\n")
    out.data("L", b"y\n")
    out.close()
    assert run.path == home / "runs" / RUN_ID
    for d in (home, home / "runs", run.path, run.logs):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in (run.rank_log(3), run.node_log(1)):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    run.write_plan(plan)
    assert stat.S_IMODE((run.path / "plan.json").stat().st_mode) == 0o600


def test_run_directory_is_private_even_with_a_permissive_umask(plan, home):
    old = os.umask(0)
    try:
        run = RunDir.create(RUN_ID)
        out = NodeOutput(plan.nodes[0], run, Screen().term, False)
        out.data(key(0), b"x\n")
        out.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(run.rank_log(0).stat().st_mode) == 0o600


# --- the failure summary and exit code -------------------------------------------------------------


def write_log(path, n: int, prefix: str) -> None:
    path.write_text("".join(f"{prefix} {i}\n" for i in range(n)))


def test_summary_names_the_failing_rank_then_its_last_lines_then_the_ranks_it_took_down(plan, run):
    w, x = plan.nodes
    write_log(run.rank_log(4), 20, "x1 line")
    write_log(run.rank_log(3), 2, "x0 line")
    results = [
        NodeResult(x, "exited", 1, [RankFailure(rank=4, local_rank=1, exitcode=7),
                                    RankFailure(rank=3, local_rank=0, exitcode=-15)]),
        NodeResult(w, "exited", -15, stopped=True),
    ]
    assert summary(results, run, tail=3) == [
        "clusterrun: rank 4 (nodeX, local rank 1) exited with code 7",
        "  | x1 line 17",
        "  | x1 line 18",
        "  | x1 line 19",
        "clusterrun: rank 3 (nodeX, local rank 0) was stopped (SIGTERM) after rank 4 failed",
        "clusterrun: node nodeW (ranks 0-2) was stopped after rank 4 failed",
    ]
    assert exit_code(results, interrupted=False) == EXIT_JOB_FAILED == 1


def test_summary_shows_a_progress_bar_as_one_line_not_its_redraws(plan, run):
    x = plan.nodes[1]
    run.rank_log(4).write_bytes(b"epoch 3\n" + b"".join(b"\r %d%%|" % i for i in range(40))
                                + b"\nTraceback (most recent call last):\nValueError: bad batch\n")
    results = [NodeResult(x, "exited", 1, [RankFailure(rank=4, local_rank=1, exitcode=1)])]
    assert summary(results, run, tail=3)[1:] == ["  |  39%|", "  | Traceback (most recent call last):",
                                                 "  | ValueError: bad batch"]


def test_summary_says_a_rank_killed_after_its_script_finished_had_done_its_work(plan, run):
    x = plan.nodes[1]
    results = [NodeResult(x, "exited", 1, [RankFailure(rank=3, local_rank=0, exitcode=-6, exit_time=10.0,
                                                       finished=True),
                                           RankFailure(rank=4, local_rank=1, exitcode=-6, exit_time=10.1)])]
    assert summary(results, run) == [
        "clusterrun: rank 3 (nodeX, local rank 0) was killed by SIGABRT after its script had finished, "
        "while Python shut down: its work was done",
        "clusterrun: rank 4 (nodeX, local rank 1) was killed by SIGABRT",
    ]


def test_summary_says_out_of_memory_for_an_oom_killed_rank_and_stopped_for_the_rest(plan, run):
    x = plan.nodes[1]
    results = [NodeResult(x, "exited", 1, [RankFailure(rank=3, local_rank=0, exitcode=-9, exit_time=10.0, oom=True),
                                           RankFailure(rank=4, local_rank=1, exitcode=-15, exit_time=10.2)])]
    assert summary(results, run) == [
        "clusterrun: rank 3 (nodeX, local rank 0) was killed by SIGKILL: out of memory "
        "(the node's kernel OOM killer ended it)",
        "clusterrun: rank 4 (nodeX, local rank 1) was stopped (SIGTERM) after rank 3 failed",
    ]


def test_summary_the_guides_example(run):
    """GUIDE.md: rank 3 on node2 (local rank 1) fails, rank 2 on node2 is stopped."""
    hosts = parse_hosts({"hosts": ["node0:1", "node1:1", "node2:2"]})
    plan = make_plan(hosts, LaunchOptions("t.py"), run_id=RUN_ID, master_addr="10.0.0.1", master_port=1,
                     controller_python="python3", local_home="/tmp/crh")
    node2 = plan.nodes[2]
    run.rank_log(3).write_text("Traceback (most recent call last):\nValueError: bad batch\n")
    lines = summary([NodeResult(node2, "exited", 1, [RankFailure(3, 1, 7), RankFailure(2, 0, -15)])], run)
    assert lines == [
        "clusterrun: rank 3 (node2, local rank 1) exited with code 7",
        "  | Traceback (most recent call last):",
        "  | ValueError: bad batch",
        "clusterrun: rank 2 (node2, local rank 0) was stopped (SIGTERM) after rank 3 failed",
    ]


def test_summary_in_words_for_signals(plan, run):
    w, x = plan.nodes
    lines = summary([NodeResult(x, "exited", 1, [RankFailure(4, 1, -9)]),
                     NodeResult(w, "exited", 1, [RankFailure(0, 0, 139)])], run)
    assert lines == ["clusterrun: rank 4 (nodeX, local rank 1) was killed by SIGKILL",
                     "clusterrun: rank 0 (nodeW, local rank 0) exited with code 139 (SIGSEGV)"]


def test_summary_for_a_lost_node_and_one_that_could_not_start(plan, run):
    w, x = plan.nodes
    run.node_log(1).write_text("connection reset\n")
    lines = summary([NodeResult(x, "lost", message="the job's processes are gone"),
                     NodeResult(w, "failed-to-start", 127, message="python3: not found")], run)
    assert lines == ["clusterrun: node nodeX (node_rank 1) was lost: the job's processes are gone",
                     "  | connection reset",
                     "clusterrun: node nodeW (node_rank 0) could not start: python3: not found"]


def test_success_has_no_summary_and_exit_0(plan, run):
    results = [NodeResult(n, "exited", 0) for n in plan.nodes]
    assert summary(results, run) == []
    assert exit_code(results, interrupted=False) == EXIT_OK == 0


def test_exit_codes(plan):
    ok = [NodeResult(n, "exited", 0) for n in plan.nodes]
    failed = [NodeResult(plan.nodes[0], "exited", 1), NodeResult(plan.nodes[1], "exited", 0)]
    lost = [NodeResult(plan.nodes[0], "lost"), NodeResult(plan.nodes[1], "exited", 0)]
    assert exit_code(ok, interrupted=False) == 0
    assert exit_code(failed, interrupted=False) == 1
    assert exit_code(lost, interrupted=False) == 1
    assert exit_code(ok, interrupted=True) == EXIT_INTERRUPTED == 130
    assert exit_code(failed, interrupted=True) == 130


def test_summary_lists_every_rank_that_failed_on_its_own_in_the_order_they_ended(plan, run):
    """Ranks on two nodes fail by themselves within 30 ms; the report that arrives first
    (node X's) is not the first failure. Nobody was stopped, and nobody is called so."""
    w, x = plan.nodes
    results = [
        NodeResult(x, "exited", 1, [RankFailure(3, 0, 1, exit_time=100.030)]),
        NodeResult(w, "exited", 1, [RankFailure(2, 2, 1, exit_time=100.000),
                                    RankFailure(0, 0, 1, exit_time=100.010)]),
    ]
    assert summary(results, run) == [
        "clusterrun: rank 2 (nodeW, local rank 2) exited with code 1",
        "clusterrun: rank 0 (nodeW, local rank 0) exited with code 1",
        "clusterrun: rank 3 (nodeX, local rank 0) exited with code 1",
    ]


def test_summary_calls_stopped_only_the_ranks_the_stop_reached(plan, run):
    """Node W got the stop, but its rank 1 had already failed by itself."""
    w, x = plan.nodes
    results = [
        NodeResult(x, "exited", 1, [RankFailure(4, 1, 7, exit_time=50.0)]),
        NodeResult(w, "exited", 1, [RankFailure(1, 1, 1, exit_time=50.2),
                                    RankFailure(0, 0, None, exit_time=51.0, stopped=True),
                                    RankFailure(2, 2, -15, exit_time=51.0, stopped=True)], stopped=True),
    ]
    assert summary(results, run) == [
        "clusterrun: rank 4 (nodeX, local rank 1) exited with code 7",
        "clusterrun: rank 1 (nodeW, local rank 1) exited with code 1",
        "clusterrun: node nodeW (ranks 0, 2) was stopped after rank 4 failed",
    ]


def test_summary_says_rank_not_ranks_for_one_process(run):
    hosts = parse_hosts({"hosts": ["a:1", "b:1"]})
    a, b = make_plan(hosts, LaunchOptions("t.py"), run_id=RUN_ID, master_addr="10.0.0.1", master_port=1,
                     controller_python="python3", local_home="/tmp/crh").nodes
    lines = summary([NodeResult(b, "exited", 1, [RankFailure(1, 0, 2, exit_time=1.0)]),
                     NodeResult(a, "exited", -15, stopped=True)], run)
    assert lines[-1] == "clusterrun: node a (rank 0) was stopped after rank 1 failed"


def test_summary_names_a_rank_that_raised_its_own_error_as_failed_not_stopped(plan, run):
    """Both ranks of a node raised their own error; torchrun's SIGTERM (sent once rank 3 had
    exited) ended rank 4 while it exited. Rank 4 was not stopped: it had failed by itself."""
    x = plan.nodes[1]
    run.rank_log(4).write_text("Traceback (most recent call last):\nValueError: rank 4: bad config\n")
    results = [NodeResult(x, "exited", 1, [RankFailure(3, 0, 1, exit_time=10.0, raised="ValueError"),
                                           RankFailure(4, 1, -15, exit_time=10.1, raised="ValueError")])]
    assert summary(results, run) == [
        "clusterrun: rank 3 (nodeX, local rank 0) exited with code 1",
        "clusterrun: rank 4 (nodeX, local rank 1) raised ValueError, then was killed by SIGTERM while it exited",
        "  | Traceback (most recent call last):",
        "  | ValueError: rank 4: bad config",
    ]
