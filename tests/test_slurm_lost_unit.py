"""Unit: whether slurmctld holds a node for gone (slurm.node_gone), which names a Slurm
node lost once its step has fallen silent. scontrol here is a small script on PATH that
answers as Slurm 22.05 did for a crashed node (scripts/slurmcluster crash; the e2e test is
tests/test_slurm_restart_e2e.py)."""

from __future__ import annotations

import os
import stat

import pytest

from clusterrun.slurm import node_gone

LINE = ("NodeName=n2 Arch=x86_64 CoresPerSocket=1 CPUAlloc=2 CPUTot=2 NodeAddr=10.0.0.12 "
        "NodeHostName=n2 Version=22.05.8 OS=Linux State={state} ThreadsPerCore=1 {reason}"
        "Partitions=p BootTime=None")


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """answer(STDOUT, CODE): `scontrol` on PATH prints STDOUT and exits with CODE."""
    def answer(stdout: str, code: int = 0) -> None:
        (tmp_path / "out").write_text(stdout)
        script = tmp_path / "scontrol"
        script.write_text(f"#!/bin/sh\ncat {tmp_path}/out\n[ {code} = 0 ] || echo 'slurm_load_node error: "
                          f"Unable to contact slurm controller' >&2\nexit {code}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)

    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return answer


@pytest.mark.parametrize("state", ["ALLOCATED", "MIXED", "IDLE", "ALLOCATED+DRAIN"])
def test_a_node_slurm_has_up_is_not_gone(scontrol, state):
    scontrol(LINE.format(state=state, reason=""))
    assert node_gone("n2") is None


def test_a_node_that_does_not_respond_is_gone_in_slurms_words(scontrol):
    scontrol(LINE.format(state="ALLOCATED+NOT_RESPONDING", reason=""))
    assert node_gone("n2") == "Slurm says the node is ALLOCATED+NOT_RESPONDING"


def test_a_down_node_is_gone_with_its_reason(scontrol):
    scontrol(LINE.format(state="DOWN+NOT_RESPONDING", reason="Reason=Not responding [slurm@2026-12-07T12:57:08] "))
    assert node_gone("n2") == ("Slurm says the node is DOWN+NOT_RESPONDING "
                               "(Not responding [slurm@2026-12-07T12:57:08])")


def test_no_answer_from_slurm_is_no_proof_of_a_lost_node(scontrol, monkeypatch, tmp_path):
    scontrol("", code=1)
    assert node_gone("n2") is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert node_gone("n2") is None
