"""The run's control socket: `kill` asks the live collector, or learns there is none."""

from __future__ import annotations

import subprocess
import sys
import threading

from clusterrun.run.control import SOCKET, ControlServer, request_kill
from clusterrun.run.runs import RunDir


def test_kill_request_reaches_the_collector_and_gets_its_answer(tmp_path):
    # Deeper than sockaddr_un holds (~108 bytes), as under a long $CLUSTERRUN_HOME.
    run = RunDir(tmp_path / ("d" * 60) / ("e" * 60) / "20261126-120000-abcdef")
    run.path.mkdir(parents=True)
    asked = []

    def on_kill(grace: float) -> list[str]:
        asked.append(grace)
        return ["n2: {'left': 1}"]

    server = ControlServer.start(run, on_kill)
    assert server is not None and (run.path / SOCKET).exists()
    try:
        assert request_kill(run, 2.5) == ["n2: {'left': 1}"]
        assert asked == [2.5]
    finally:
        server.close()
    assert not (run.path / SOCKET).exists()
    assert request_kill(run, 1.0) is None       # nobody collecting: kill must go over SSH itself


def test_a_dead_collectors_socket_is_no_answer(tmp_path):
    # A collector process that dies (SIGKILL, say) leaves its socket file behind.
    subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; "
                    "from clusterrun.run.control import ControlServer; from clusterrun.run.runs import RunDir; "
                    "ControlServer.start(RunDir(Path(sys.argv[1])), lambda g: []); os._exit(0)",
                    str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / SOCKET).exists()
    assert request_kill(RunDir(tmp_path), 1.0) is None


def test_close_waits_for_an_answer_in_progress(tmp_path):
    """The collector process must not exit while a kill is being answered."""
    run = RunDir(tmp_path)
    release = threading.Event()
    server = ControlServer.start(run, lambda grace: [] if release.wait(10) else ["timeout"])
    assert server is not None
    got = []
    asker = threading.Thread(target=lambda: got.append(request_kill(run, 1.0)))
    asker.start()
    while not server.answering:         # the request is taken (bounded: the asker times out)
        asker.join(0.01)
        assert asker.is_alive()
    threading.Timer(0.2, release.set).start()
    server.close()
    asker.join(10)
    assert got == [[]]
