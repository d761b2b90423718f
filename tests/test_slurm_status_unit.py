"""Unit: `status`, `status --json` and `ps` of a run on Slurm show its job and the job's
state as Slurm tells it (squeue, else scontrol show job), next to the run's own state.

squeue and scontrol here are small scripts on PATH that answer as Slurm 22.05 does
(the words measured on scripts/slurmcluster); the e2e tests ask a real Slurm
(tests/test_slurm_live_e2e.py). A run not on Slurm shows nothing new: its output is
pinned byte for byte in tests/test_records_unit.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterrun.cli import main
from clusterrun.hostsfile import parse_hosts
from clusterrun.model import NodeState
from clusterrun.options import LaunchOptions
from clusterrun.plan import make_plan
from clusterrun.run.records import NodeRecord
from clusterrun.run.runs import RunDir
from clusterrun.slurm import JobState, job_states

INVALID = "slurm_load_jobs error: Invalid job id specified"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "crh"
    monkeypatch.setenv("CLUSTERRUN_HOME", str(h))
    return h


@pytest.fixture
def slurm_bin(tmp_path, monkeypatch):
    """answer(TOOL, STDOUT, STDERR, CODE): TOOL (squeue, scontrol) on PATH answers so, and
    appends its arguments to TOOL.args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def answer(tool: str, stdout: str = "", stderr: str = "", code: int = 0) -> None:
        (bin_dir / f"{tool}.out").write_text(stdout)
        (bin_dir / f"{tool}.err").write_text(stderr)
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "$@" >> {bin_dir}/{tool}.args\ncat {bin_dir}/{tool}.out\n'
                          f'cat {bin_dir}/{tool}.err >&2\nexit {code}\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    answer.dir = bin_dir        # type: ignore[attr-defined]
    return answer


def make_run(run_id: str, job: str | None, state: NodeState = NodeState.RUNNING) -> RunDir:
    hosts = parse_hosts({"nproc_per_node": 2, "hosts": [{"host": n} for n in ("n1", "n2")]}, "HOSTS slurm")
    if job is not None:
        hosts = dataclasses.replace(hosts, hosts=tuple(dataclasses.replace(h, transport="srun", slurm_job=job)
                                                      for h in hosts.hosts))
    plan = make_plan(hosts, LaunchOptions("train.py", ()), run_id=run_id, master_addr="10.0.0.1",
                     master_port=29500, controller_python="python3", local_home="/tmp/h")
    run = RunDir.create(run_id)
    run.write_plan(plan)
    for k, name in enumerate(("n1", "n2")):
        run.set_node_state(k, NodeRecord(name, state, time=1.0, code=0 if state == NodeState.EXITED else None))
    return run


def cli(*args: str) -> str:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


def test_status_of_a_live_slurm_run_shows_its_job_and_state(slurm_bin):
    slurm_bin("squeue", "14|RUNNING|None\n")
    run = make_run("20260101-000000-aaaaaa", "14")
    with run.lock():            # its collector is at work
        lines = cli("status", run.run_id).splitlines()
        data = json.loads(cli("status", "--json", run.run_id))
    assert lines[0] == "run 20260101-000000-aaaaaa: running (2 nodes, 4 ranks, HOSTS slurm)"
    assert lines[1] == "slurm job 14: RUNNING"
    assert data["state"] == "running"
    assert data["slurm"] == {"job": "14", "state": "RUNNING", "reason": "", "why": ""}
    assert list(data)[-1] == "slurm"        # added after every key status --json always had
    asked = (slurm_bin.dir / "squeue.args").read_text().splitlines()     # once per command
    assert asked == ["--noheader --jobs=14 --format=%i|%T|%r"] * 2


def test_a_pending_job_shows_slurms_reason(slurm_bin):
    slurm_bin("squeue", "15|PENDING|Resources\n")
    assert job_states(["15"]) == {"15": JobState("15", "PENDING", "Resources")}
    assert job_states(["15"])["15"].text() == "slurm job 15: PENDING (Resources)"


def test_a_job_squeue_no_longer_lists_is_asked_of_scontrol(slurm_bin):
    slurm_bin("squeue", "", INVALID + "\n", 1)
    slurm_bin("scontrol", "JobId=16 JobName=x UserId=root(0) JobState=COMPLETED Reason=None Dependency=(null)\n")
    run = make_run("20260101-000000-aaaaaa", "16", NodeState.EXITED)
    lines = cli("status", run.run_id).splitlines()
    assert lines[0].startswith("run 20260101-000000-aaaaaa: succeeded (")
    assert lines[1] == "slurm job 16: COMPLETED"


def test_a_job_slurm_has_forgotten_says_so(slurm_bin):
    slurm_bin("squeue", "", INVALID + "\n", 1)
    slurm_bin("scontrol", "", INVALID + "\n", 1)
    run = make_run("20260101-000000-aaaaaa", "17", NodeState.EXITED)
    assert cli("status", run.run_id).splitlines()[1] == "slurm job 17: no longer known to Slurm (it ended)"
    data = json.loads(cli("status", "--json", run.run_id))
    assert data["slurm"] == {"job": "17", "state": None, "reason": "", "why": "no longer known to Slurm (it ended)"}


def test_without_slurm_clients_status_still_answers(slurm_bin, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run = make_run("20260101-000000-aaaaaa", "18", NodeState.EXITED)
    assert cli("status", run.run_id).splitlines()[1] == "slurm job 18: state not known here: no squeue on PATH"


def test_a_slurm_client_that_fails_is_quoted_in_one_line(slurm_bin):
    slurm_bin("squeue", "", "squeue: error: Unable to contact slurm controller (connect failure)\n", 1)
    slurm_bin("scontrol", "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n", 1)
    st = job_states(["19"])["19"]
    assert st.state is None
    assert st.text() == ("slurm job 19: state not known: `scontrol` failed: slurm_load_jobs error: "
                         "Unable to contact slurm controller (connect failure)")


def test_ps_adds_a_slurm_column_only_where_a_run_is_on_slurm(slurm_bin):
    slurm_bin("squeue", "14|RUNNING|None\n")
    ssh = make_run("20260101-000000-aaaaaa", None, NodeState.EXITED)
    header = "run                     state           nodes  ranks  script\n"
    assert cli("ps") == header + "20260101-000000-aaaaaa  succeeded           2      4  train.py\n"
    assert not (slurm_bin.dir / "squeue.args").exists()     # no run on Slurm: Slurm is not asked
    on_slurm = make_run("20260101-000001-bbbbbb", "14")
    with on_slurm.lock():
        out = cli("ps")
    assert out == ("run                     state           nodes  ranks  slurm job   script\n"
                   "20260101-000001-bbbbbb  running             2      4  14 RUNNING  train.py\n"
                   "20260101-000000-aaaaaa  succeeded           2      4              train.py\n")
