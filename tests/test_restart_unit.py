"""Who runs the next attempt (restart.next_roster), with stand-in connections: a lost node
comes back if it answers, else the first spare that is reachable and passes the preflight
takes its place (the end-to-end test is in test_restart_e2e.py)."""

from __future__ import annotations

import dataclasses
import io

import pytest

from clusterrun.run import restart
from clusterrun.errors import UnreachableError
from clusterrun.hostsfile import parse_hosts
from clusterrun.model import NodeResult, NodeState
from clusterrun.run.stream import Terminal


class Link:
    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    def alive(self) -> bool:
        return not self.closed

    def close(self, linger: bool = False) -> None:
        self.closed = True


@pytest.fixture
def setting(plan, monkeypatch):
    """nodeW is up; nodeX was lost and does not answer; spares: one unreachable, one
    unfit, one fit."""
    hosts = parse_hosts({"nproc_per_node": 2, "hosts": ["gpu-w", "gpu-x"],
                         "spares": ["gone", "unfit", "fit"]})
    made: dict[str, Link] = {}

    def connect(host, timeout, prove=False):
        if host.host in ("gpu-x", "gone"):
            raise UnreachableError(f"{host.host}: connection refused")
        made[host.host] = Link(host.host)
        return made[host.host]

    monkeypatch.setattr(restart, "connect_node", connect)
    roster = restart.Roster(hosts, [Link("gpu-w"), Link("gpu-x")], list(hosts.spares))
    results = [NodeResult(plan.nodes[0], NodeState.EXITED, 1), NodeResult(plan.nodes[1], NodeState.LOST)]
    err = io.StringIO()
    return roster, results, Terminal(io.BytesIO(), err), err, made


def test_the_first_spare_that_is_reachable_and_fit_takes_the_lost_nodes_place(setting):
    roster, results, term, err, made = setting
    vetted = []

    def vet(hosts, transports, i):
        vetted.append(([h.host for h in hosts.hosts], i, transports[i].name))
        return ["torch 2.1.0 differs from the others' 2.13.0"] if hosts.hosts[i].host == "unfit" else []

    nxt = restart.next_roster(roster, results, term, vet)
    assert [h.host for h in nxt.hosts.hosts] == ["gpu-w", "fit"]
    assert [t.name for t in nxt.transports] == ["gpu-w", "fit"] and nxt.transports[0] is roster.transports[0]
    assert nxt.replaced == {"fit": "gpu-x"} and nxt.spares == []
    assert vetted == [(["gpu-w", "unfit"], 1, "unfit"), (["gpu-w", "fit"], 1, "fit")]
    assert made["unfit"].closed and not made["fit"].closed
    assert err.getvalue().splitlines() == [
        "clusterrun: spare gone is unreachable too: gone: connection refused",
        "clusterrun: spare unfit cannot stand in: torch 2.1.0 differs from the others' 2.13.0",
        "clusterrun: gpu-x was lost; fit takes node_rank 1",
    ]


def test_with_no_fit_spare_left_the_missing_node_is_named(setting):
    roster, results, term, err, made = setting
    with pytest.raises(UnreachableError, match=r"^gpu-x \(node_rank 1\) is missing and no spare is left"):
        restart.next_roster(roster, results, term, lambda hosts, transports, i: ["script 't.py' not found"])
    assert all(link.closed for link in made.values())


def test_the_lost_nodes_are_called_back_at_once_not_one_connect_timeout_after_another(plan, monkeypatch):
    """Both nodes were lost: each answers only once the other is being called too (a
    barrier), which a one-after-another reconnect never reaches."""
    import threading

    hosts = parse_hosts({"nproc_per_node": 2, "hosts": ["gpu-w", "gpu-x"], "connect_timeout": 5})
    both = threading.Barrier(2, timeout=5)

    def connect(host, timeout, prove=False):
        both.wait()
        return Link(host.host)

    monkeypatch.setattr(restart, "connect_node", connect)
    roster = restart.Roster(hosts, [Link("gpu-w"), Link("gpu-x")], [])
    results = [NodeResult(n, NodeState.LOST) for n in plan.nodes]
    nxt = restart.next_roster(roster, results, Terminal(io.BytesIO(), io.StringIO()))
    assert [t.name for t in nxt.transports] == ["gpu-w", "gpu-x"]
    assert all(old.closed for old in roster.transports) and not any(t.closed for t in nxt.transports)


def test_a_lost_node_is_called_back_whatever_order_the_nodes_ended_in(plan, monkeypatch):
    """The results come in the order the nodes ended: node 1 was lost first (its link
    still looks up), node 0 exited after it. Node 1 is called back, node 0 kept."""
    hosts = parse_hosts({"nproc_per_node": 2, "hosts": ["gpu-w", "gpu-x"]})
    called = []

    def connect(host, timeout, prove=False):
        called.append(host.host)
        return Link(host.host)

    monkeypatch.setattr(restart, "connect_node", connect)
    roster = restart.Roster(hosts, [Link("gpu-w"), Link("gpu-x")], [])
    results = [NodeResult(plan.nodes[1], NodeState.LOST), NodeResult(plan.nodes[0], NodeState.EXITED, 1)]
    nxt = restart.next_roster(roster, results, Terminal(io.BytesIO(), io.StringIO()))
    assert called == ["gpu-x"]
    assert nxt.transports[0] is roster.transports[0] and roster.transports[1].closed


def test_on_slurm_every_node_is_proved_by_a_step_before_the_next_attempt(plan, monkeypatch):
    """No connection is held on Slurm: a node that exited well is proved again (a step
    starts there), and one whose step cannot start is missing, its spare takes over."""
    hosts = parse_hosts({"nproc_per_node": 2, "hosts": ["n1", "n2"], "spares": ["n3"]})
    hosts = dataclasses.replace(hosts, hosts=tuple(dataclasses.replace(h, transport="srun", slurm_job="7")
                                                   for h in hosts.hosts),
                                spares=tuple(dataclasses.replace(h, transport="srun", slurm_job="7")
                                             for h in hosts.spares))
    proved = []

    def connect(host, timeout, prove=False):
        proved.append((host.host, prove))
        if host.host == "n2":
            raise UnreachableError("n2: no step of Slurm job 7 could start on it (srun: error: Unable to "
                                   "create step for job 7: Requested node configuration is not available)")
        return Link(host.host)

    monkeypatch.setattr(restart, "connect_node", connect)
    roster = restart.Roster(hosts, [Link("n1"), Link("n2")], list(hosts.spares))
    results = [NodeResult(n, NodeState.EXITED, 1) for n in plan.nodes]
    err = io.StringIO()
    nxt = restart.next_roster(roster, results, Terminal(io.BytesIO(), err))
    assert sorted(proved) == [("n1", True), ("n2", True), ("n3", True)]
    assert [h.host for h in nxt.hosts.hosts] == ["n1", "n3"] and nxt.replaced == {"n3": "n2"}
    assert "clusterrun: n2 was lost; n3 takes node_rank 1" in err.getvalue()
