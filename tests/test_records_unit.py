"""Unit: the run records (state.json, attempts.json, hang.json) and the views that read them.

The files here are written as clusterrun writes them (and as older versions did),
byte for byte; `status`, `status --json` and `ps` must show them exactly as they
always have, and a record must come back from its file as it went in.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterrun.cli import main
from clusterrun.hostsfile import parse_hosts
from clusterrun.model import NodeState, RankFailure
from clusterrun.nodeagent import Event
from clusterrun.options import LaunchOptions
from clusterrun.plan import make_plan
from clusterrun.run.records import AttemptRecord, HangRecord, NodeRecord
from clusterrun.run.runs import RunDir


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "crh"
    monkeypatch.setenv("CLUSTERRUN_HOME", str(h))
    return h


def make_run(run_id: str, names: list[str], attempt: int = 0) -> RunDir:
    hosts = parse_hosts({"nproc_per_node": 2, "hosts": [{"host": f"gpu-{n}", "name": n} for n in names]},
                        "/etc/hosts.yaml")
    plan = make_plan(hosts, LaunchOptions("train.py", ("--lr", "0.1")), run_id=run_id, master_addr="10.0.0.1",
                     master_port=29500, controller_python="python3", local_home="/tmp/h", attempt=attempt)
    run = RunDir.create(run_id)
    run.write_plan(plan)
    return run


def write(run: RunDir, name: str, data: object) -> None:
    """As RunDir.write_json writes it (indent=1), so the same bytes as a real run's."""
    (run.path / name).write_text(json.dumps(data, indent=1))


def cli(*args: str) -> str:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


F = {"rank": 2, "local_rank": 0, "exitcode": 1, "exit_time": 100.5, "stopped": False, "oom": False,
     "finished": False}


def failed_run() -> RunDir:
    """Ended: one node fine, one failed by itself, one OOM-killed, one stopped; a hang."""
    run = make_run("20260101-000000-aaaaaa", ["nodeA", "nodeB", "nodeC", "nodeD"])
    write(run, "state.json", {
        "0": {"node": "nodeA", "state": "exited", "code": 0, "message": "", "stopped": False,
              "failures": [], "time": 101.0},
        "1": {"node": "nodeB", "state": "exited", "code": 1, "message": "", "stopped": False,
              "failures": [F, {**F, "rank": 3, "local_rank": 1, "exitcode": -15, "exit_time": 100.6}],
              "time": 101.0},
        "2": {"node": "nodeC", "state": "exited", "code": 1, "message": "", "stopped": False,
              "failures": [{**F, "rank": 4, "exitcode": -9, "oom": True}], "time": 101.0},
        "3": {"node": "nodeD", "state": "exited", "code": -15, "message": "", "stopped": True,
              "failures": [{**F, "rank": 6, "exitcode": -15, "stopped": True}], "time": 101.0},
    })
    write(run, "hang.json", {"time": 99.0, "diagnosis": "no output for 5m: every rank in allreduce",
                             "stacks": "/x/stacks/1.txt"})
    write(run, "result.json", [])
    return run


def restarted_run() -> RunDir:
    """Ended after a restart, a spare in a lost node's place; a lost node and a killed one."""
    run = make_run("20260101-000001-bbbbbb", ["nodeA", "spare1", "nodeC"], attempt=1)
    write(run, "attempts.json", [
        {"attempt": 0, "time": 50.0, "max_restarts": 2, "starts": {}, "nodes": ["nodeA", "nodeB", "nodeC"],
         "replaced": {}},
        {"attempt": 1, "time": 60.0, "max_restarts": 2, "starts": {"rank0.log": 10, "node0.log": 3},
         "nodes": ["nodeA", "spare1", "nodeC"], "replaced": {"spare1": "nodeB"}},
    ])
    write(run, "state.json", {
        "0": {"node": "nodeA", "state": "killed", "code": None, "message": "clusterrun kill", "stopped": True,
              "failures": [], "time": 70.0},
        "1": {"node": "spare1", "state": "lost", "code": None, "message": "unreachable for 60s", "stopped": False,
              "failures": [], "time": 70.0},
        "2": {"node": "nodeC", "state": "failed-to-start", "code": None, "message": "python3: not found",
              "stopped": False, "failures": [], "time": 70.0},
    })
    write(run, "result.json", [])
    return run


def running_run() -> RunDir:
    """Not ended: one node running (as its start records it), one still starting."""
    run = make_run("20260101-000002-cccccc", ["nodeA", "nodeB"])
    write(run, "attempts.json", [{"attempt": 0, "time": 50.0, "max_restarts": 1, "starts": {},
                                  "nodes": ["nodeA", "nodeB"], "replaced": {}}])
    write(run, "state.json", {
        "0": {"node": "nodeA", "state": "running", "pgid": 4242, "ifname": "eth0", "time": 60.0},
        "1": {"node": "nodeB", "state": "starting", "time": 60.0},
    })
    long_ago = time.time() - 400
    for g in (0, 1):
        run.rank_log(g).write_bytes(b"step\n")
        os.utime(run.rank_log(g), (long_ago, long_ago))
    return run


def old_run() -> RunDir:
    """A record as the first versions wrote it: no message, no failures' exit times."""
    run = make_run("20251101-000000-dddddd", ["nodeA", "nodeB"])
    write(run, "state.json", {"0": {"node": "nodeA", "state": "exited", "code": 0},
                              "1": {"node": "nodeB", "state": "exited", "code": 1, "time": 5.0,
                                    "failures": [{"rank": 2, "local_rank": 0, "exitcode": 1}]}})
    write(run, "result.json", [])
    return run


STATUS_FAILED = """\
run 20260101-000000-aaaaaa: failed (4 nodes, 8 ranks, /etc/hosts.yaml)
node   node_rank  ranks      state
nodeA          0  0-1        exited with code 0
nodeB          1  2-3        exited with code 1
nodeC          2  4-5        exited with code 1 (rank 4 out of memory)
nodeD          3  6-7        stopped
hang: no output for 5m: every rank in allreduce (stacks: /x/stacks/1.txt)
"""

STATUS_RESTARTED = """\
run 20260101-000001-bbbbbb: killed (3 nodes, 6 ranks, /etc/hosts.yaml, attempt 1 of 0-2, spare1 in place of nodeB)
node    node_rank  ranks      state
nodeA           0  0-1        killed: clusterrun kill
spare1          1  2-3        lost: unreachable for 60s
nodeC           2  4-5        failed-to-start: python3: not found
"""

STATUS_RUNNING = """\
run 20260101-000002-cccccc: starting (2 nodes, 4 ranks, /etc/hosts.yaml, attempt 0 of 0-1)
node   node_rank  ranks      state
nodeA          0  0-1        running
nodeB          1  2-3        starting
quiet for (rank: time since its last line): 0: 6m, 1: 6m, 2: no line yet, 3: no line yet
"""

STATUS_OLD = """\
run 20251101-000000-dddddd: failed (2 nodes, 4 ranks, /etc/hosts.yaml)
node   node_rank  ranks      state
nodeA          0  0-1        exited with code 0
nodeB          1  2-3        exited with code 1
"""


def test_status_text_is_as_it_always_was():
    failed, restarted, running, old = failed_run(), restarted_run(), running_run(), old_run()
    assert cli("status", failed.run_id) == STATUS_FAILED
    assert cli("status", restarted.run_id) == STATUS_RESTARTED
    assert cli("status", old.run_id) == STATUS_OLD
    with running.lock():            # a collector is at work: status reads the files as they are
        assert cli("status", running.run_id) == STATUS_RUNNING


def test_status_json_keeps_every_key_and_value():
    failed, restarted = failed_run(), restarted_run()
    data = json.loads(cli("status", "--json", failed.run_id))
    assert list(data) == ["run", "state", "hosts", "world_size", "nodes", "hang", "attempt",
                          "max_restarts", "replaced"]
    assert list(data["nodes"][0]) == ["node", "host", "node_rank", "ranks", "state", "code", "message",
                                      "stopped", "failures", "quiet"]
    assert data["hang"] == {"time": 99.0, "diagnosis": "no output for 5m: every rank in allreduce",
                            "stacks": "/x/stacks/1.txt"}
    assert data["nodes"][1] == {
        "node": "nodeB", "host": "gpu-nodeB", "node_rank": 1, "ranks": [2, 3], "state": "exited", "code": 1,
        "message": "", "stopped": False, "quiet": {"2": None, "3": None},
        # A fact the record does not hold takes its default ("raised": none recorded).
        "failures": [{**F, "raised": ""}, {**F, "rank": 3, "local_rank": 1, "exitcode": -15, "exit_time": 100.6,
                                           "raised": ""}]}
    assert (data["run"], data["state"], data["world_size"], data["attempt"], data["max_restarts"],
            data["replaced"]) == ("20260101-000000-aaaaaa", "failed", 8, 0, 0, {})
    # The exact bytes: the keys in their order, indent=1, as status --json has always printed.
    assert cli("status", "--json", failed.run_id) == json.dumps(data, indent=1) + "\n"
    data = json.loads(cli("status", "--json", restarted.run_id))
    assert (data["state"], data["attempt"], data["max_restarts"], data["replaced"], data["hang"]) == (
        "killed", 1, 2, {"spare1": "nodeB"}, None)
    assert [(n["node"], n["state"], n["code"], n["message"], n["stopped"]) for n in data["nodes"]] == [
        ("nodeA", "killed", None, "clusterrun kill", True), ("spare1", "lost", None, "unreachable for 60s", False),
        ("nodeC", "failed-to-start", None, "python3: not found", False)]


def test_status_json_of_a_running_node_has_no_code_yet():
    running = running_run()
    with running.lock():
        data = json.loads(cli("status", "--json", running.run_id))
    assert data["state"] == "starting"
    assert [(n["state"], n["code"], n["message"], n["stopped"], n["failures"]) for n in data["nodes"]] == [
        ("running", None, "", False, []), ("starting", None, "", False, [])]
    assert 399 < data["nodes"][0]["quiet"]["0"] < 460 and data["nodes"][1]["quiet"] == {"2": None, "3": None}


def test_ps_shows_every_run_as_it_always_did(home):
    failed_run(), restarted_run(), old_run()
    running = running_run()
    (RunDir.create("20260101-000003-eeeeee").path / "plan.json").write_text("{")
    # A run that may restart says which attempt it is at, numbered from 0 as everywhere;
    # the state column widens to hold it.

    def listing(running_state: str) -> str:
        w = len(running_state)      # the widest state: the column widens to hold it

        def row(run_id: str, state: str, nodes: int, ranks: int) -> str:
            return f"{run_id}  {state:<{w}}  {nodes:>5}  {ranks:>5}  train.py --lr 0.1\n"

        return (f"run                     {'state':<{w}}  nodes  ranks  script\n"
                f"20260101-000003-eeeeee  {'unreadable':<{w}}\n"
                + row("20260101-000002-cccccc", running_state, 2, 4)
                + row("20260101-000001-bbbbbb", "killed, attempt 1 of 0-2", 3, 6)
                + row("20260101-000000-aaaaaa", "failed", 4, 8) + row("20251101-000000-dddddd", "failed", 2, 4))

    # Nobody collects the running one: ps marks it (status would look at its nodes).
    assert cli("ps") == listing("starting?, attempt 0 of 0-1")
    with running.lock():
        assert cli("ps") == listing("starting, attempt 0 of 0-1")


# --- the records themselves -------------------------------------------------------


def test_a_node_record_comes_back_from_its_file_as_it_went_in():
    rec = NodeRecord("nodeB", NodeState.EXITED, time=101.0, code=1, message="", stopped=True,
                     failures=[RankFailure(2, 0, -9, 100.5, stopped=False, oom=True),
                               RankFailure(3, 1, -6, 100.7, stopped=True, finished=True)])
    again = NodeRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert again == rec and again.state is NodeState.EXITED and type(again.failures[0]) is RankFailure
    running = NodeRecord("nodeA", NodeState.RUNNING, time=5.0, pgid=42, ifname="eth0")
    assert NodeRecord.from_json(json.loads(json.dumps(running.to_json()))) == running


def test_records_written_by_the_controller_read_back_typed(tmp_path):
    """What RunController.set_state writes today (a starting node, a running one, an end)."""
    run = make_run("20260101-000010-ffffff", ["nodeA", "nodeB", "nodeC"])
    run.set_node_state(0, NodeRecord("nodeA", NodeState.STARTING, time=1.0))
    run.set_node_state(1, NodeRecord("nodeB", NodeState.RUNNING, time=2.0, pgid=7, ifname="ib0"))
    run.set_node_state(2, NodeRecord("nodeC", NodeState.EXITED, time=3.0, code=0))
    states = run.node_states()
    assert states == {0: NodeRecord("nodeA", NodeState.STARTING, time=1.0),
                      1: NodeRecord("nodeB", NodeState.RUNNING, time=2.0, pgid=7, ifname="ib0"),
                      2: NodeRecord("nodeC", NodeState.EXITED, time=3.0, code=0)}
    on_disk = json.loads((run.path / "state.json").read_text())
    assert set(on_disk) == {"0", "1", "2"}
    assert on_disk["1"]["state"] == "running" and on_disk["1"]["pgid"] == 7 and on_disk["2"]["code"] == 0


def test_an_old_shaped_state_file_reads_with_the_defaults():
    run = old_run()
    states = run.node_states()
    assert states[0] == NodeRecord("nodeA", NodeState.EXITED, time=None, code=0)
    assert states[1].failures == [RankFailure(2, 0, 1)] and states[1].message == "" and not states[1].stopped
    assert RunDir(run.path.parent / "no-such-run").node_states() == {}


def test_one_writer_keeps_every_node_when_threads_write_at_once():
    """Each node's thread records its own end: none may undo another's."""
    run = make_run("20260101-000011-abcdef", [f"n{i}" for i in range(16)])
    threads = [threading.Thread(target=run.set_node_state,
                                args=(i, NodeRecord(f"n{i}", NodeState.EXITED, time=1.0, code=i)))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: s.code for k, s in run.node_states().items()} == {i: i for i in range(16)}
    assert not list(run.path.glob("*.tmp"))


def test_attempt_and_hang_records_round_trip():
    run = restarted_run()
    first, second = run.attempts()
    assert second == AttemptRecord(attempt=1, time=60.0, max_restarts=2, starts={"rank0.log": 10, "node0.log": 3},
                                   nodes=["nodeA", "spare1", "nodeC"], replaced={"spare1": "nodeB"})
    assert AttemptRecord.from_json(json.loads(json.dumps(second.to_json()))) == second
    assert run.attempt_starts() == {"rank0.log": 10, "node0.log": 3}
    assert make_run("20260101-000012-abcdef", ["a"]).attempts() == []
    hang = HangRecord(time=9.5, diagnosis="no output for 1m", stacks="/s.txt")
    assert HangRecord.from_json(json.loads(json.dumps(hang.to_json()))) == hang
    assert failed_run().hang() == HangRecord(99.0, "no output for 5m: every rank in allreduce", "/x/stacks/1.txt")
    assert run.hang() is None


def test_kill_records_a_lost_node_it_cleaned_through_the_registry(monkeypatch):
    """`kill` of an ended run: the lost node it reached is recorded killed (its other facts
    kept); the one still unreachable stays lost; the rest is untouched."""
    run = make_run("20260101-000013-abcdef", ["nodeA", "nodeB", "nodeC"])
    lost = {"code": None, "message": "unreachable for 60s", "stopped": False, "failures": [], "time": 70.0}
    write(run, "state.json", {"0": {"node": "nodeA", "state": "exited", "code": 0, "message": "", "stopped": False,
                                    "failures": [], "time": 69.0},
                              "1": {"node": "nodeB", "state": "lost", **lost},
                              "2": {"node": "nodeC", "state": "lost", **lost}})
    write(run, "result.json", [])

    class Reached:
        def close(self, linger: bool = False) -> None:
            pass

    def connect_each(hosts, *args, **kwargs):
        return [(Reached(), "", 0.1) if h.name == "nodeB" else (None, f"{h.name}: no route to host", 0.0)
                for h in hosts]

    monkeypatch.setattr("clusterrun.transports.connect.connect_each", connect_each)
    monkeypatch.setattr("clusterrun.run.remote.kill_job", lambda n, t, grace: {"event": Event.KILLED, "left": 0})
    r = CliRunner().invoke(main, ["kill", run.run_id])
    assert r.exit_code != 0 and "no route to host (its job may still run there)" in r.output
    states = run.node_states()
    assert states[1] == NodeRecord("nodeB", NodeState.KILLED, time=70.0, message="lost, then its job was "
                                   "killed by clusterrun kill")
    assert states[2] == NodeRecord("nodeC", NodeState.LOST, time=70.0, message="unreachable for 60s")
    assert states[0] == NodeRecord("nodeA", NodeState.EXITED, time=69.0, code=0)
    assert "nodeB          1  2-3        killed: lost, then its job was killed by clusterrun kill\n" in cli(
        "status", run.run_id)


def test_status_of_a_stopped_node_whose_ranks_had_failed_by_themselves_says_so():
    """Both ranks exited 1 on their own; the stop then ended torchrun (-15): status says what
    the summary says, not "was killed by SIGTERM" (and which ranks the stop ended, if any)."""
    from clusterrun.commands.status import NodeStatus, describe_node
    from clusterrun.model import NodeState, RankFailure

    own = [RankFailure(2, 0, 1, 10.0), RankFailure(3, 1, 1, 10.1)]
    node = NodeStatus("nodeB", "gpu-nodeB", 1, 2, 3, NodeState.EXITED, -15, stopped=True, failures=own)
    assert describe_node(node) == "ranks 2-3 exited with code 1"
    raised = [RankFailure(2, 0, 1, 10.0), RankFailure(3, 1, -15, 10.1, raised="ValueError")]
    node = NodeStatus("nodeB", "gpu-nodeB", 1, 2, 3, NodeState.EXITED, -15, stopped=True, failures=raised)
    assert describe_node(node) == "rank 2 exited with code 1; rank 3 raised ValueError"
    node = NodeStatus("nodeB", "gpu-nodeB", 1, 2, 3, NodeState.EXITED, -15, stopped=True, failures=own[:1])
    assert describe_node(node) == "rank 2 exited with code 1; rank 3 stopped"
    stopped = [RankFailure(2, 0, -15, 10.0, stopped=True)]
    node = NodeStatus("nodeB", "gpu-nodeB", 1, 2, 3, NodeState.EXITED, -15, stopped=True, failures=stopped)
    assert describe_node(node) == "stopped"
