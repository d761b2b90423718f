"""Unit: one node's job seen from the controller (remote.RemoteJob), with fakes."""

from __future__ import annotations

import threading

import pytest

from clusterrun.hostsfile import parse_hosts
from clusterrun.plan import LaunchOptions, make_plan
from clusterrun.remote import RemoteJob


class NoSession(Exception):
    """The fake transport was asked for a new session (the kill mode's fallback)."""


class FakeTransport:
    name, peer_addr = "gpu-a", "10.0.0.1"

    def __init__(self) -> None:
        self.sessions = 0

    def exec(self, command: str, merge_stderr: bool = False):
        self.sessions += 1
        raise NoSession()

    def alive(self) -> bool:
        return True

    def close(self, linger: bool = False) -> None:
        pass


class FakeAgent:
    """A streaming agent that answers `kill` with a report after a moment."""

    def __init__(self, job: RemoteJob, delivers: bool = True) -> None:
        self.job, self.delivers, self.kills = job, delivers, 0

    def send(self, data: bytes) -> bool:
        if not self.delivers:
            return False
        if data.startswith(b"kill "):
            self.kills += 1
            threading.Timer(0.3, self.job._kill_reports.put, [{"forced": False, "left": 0}]).start()
        return True


def job() -> RemoteJob:
    hosts = parse_hosts({"hosts": ["gpu-a"]})
    (node,) = make_plan(hosts, LaunchOptions("train.py"), run_id="r1", master_addr="10.0.0.1",
                        master_port=29500, controller_python="/usr/bin/python3", local_home="/tmp/h").nodes
    return RemoteJob(node, FakeTransport(), output=None, master_addr="10.0.0.1")  # type: ignore[arg-type]


def test_two_stops_at_once_share_one_kill_and_one_answer():
    j = job()
    agent = j._agent = FakeAgent(j)
    reports: list[dict] = []
    threads = [threading.Thread(target=lambda: reports.append(j.stop(grace=5))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert agent.kills == 1 and j.transport.sessions == 0   # one kill, no second session
    assert [r["event"] for r in reports] == ["killed", "killed"]


def test_a_kill_that_cannot_be_written_falls_back_at_once():
    j = job()
    j._agent = FakeAgent(j, delivers=False)
    waited = []
    j._kill_reports.get = lambda **kw: waited.append(kw)    # type: ignore[method-assign]
    with pytest.raises(NoSession):              # straight to the kill mode's own session
        j.stop(grace=5)
    assert waited == [] and j.transport.sessions == 1     # no wait for an answer that cannot come
