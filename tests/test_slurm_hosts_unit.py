"""HOSTS `slurm` and a hosts file's `slurm:`: the allocation's nodes, in order, on srun.

A fake `scontrol` on PATH stands for Slurm (the e2e tests use a real one)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from clusterrun.errors import HostsFileError, UsageError
from clusterrun.hostsfile import load_hosts, parse_hosts, with_transport
from clusterrun.transports.connect import connect_node
from clusterrun.transports.srun import SrunTransport

FAKE_SCONTROL = """#!/bin/sh
case "$1 $2" in
  "show hostnames") echo node-b; echo node-a; echo node-c ;;
  "show node") for n in node-a node-b node-c; do
      echo "NodeName=$n Arch=x86_64 NodeAddr=10.9.0.$(printf %s "$n" | tail -c1 | tr abc 123) State=IDLE"; done ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "scontrol"
    tool.write_text(FAKE_SCONTROL)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node-[a-c]")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_hosts_slurm_is_the_allocation_in_scontrol_order(allocation: Path) -> None:
    hosts = load_hosts("slurm")
    assert [(h.name, h.addr, h.transport, h.slurm_job) for h in hosts.hosts] == [
        ("node-b", "10.9.0.2", "srun", "77"), ("node-a", "10.9.0.1", "srun", "77"),
        ("node-c", "10.9.0.3", "srun", "77")]
    assert hosts.spares == ()
    assert {h.workdir for h in hosts.hosts} == {str(allocation)}    # as srun: where it was started
    assert with_transport(hosts, "openssh").hosts == hosts.hosts    # --transport leaves srun alone
    node = connect_node(hosts.hosts[0], timeout=None)
    assert isinstance(node, SrunTransport) and (node.name, node.jobid) == ("node-b", "77")


def test_a_file_named_slurm_is_a_hosts_file(allocation: Path) -> None:
    (allocation / "slurm").write_text("hosts: [a, b]\n")
    assert [h.name for h in load_hosts("slurm").hosts] == ["a", "b"]


def test_outside_an_allocation_slurm_is_a_usage_error(allocation: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(UsageError, match=r"not inside a Slurm allocation.*salloc.*outside one, `clusterrun up` submits one"):
        load_hosts("slurm")


def test_a_slurm_file_gives_its_settings_and_spares(allocation: Path) -> None:
    (allocation / "h.yaml").write_text(
        "slurm: {nodes: 2, partition: gpu, time: '02:00:00', gpus_per_node: 8,\n"
        "        sbatch_args: ['--account=proj']}\n"
        "nproc_per_node: 4\npython: /shared/venv/bin/python\nworkdir: /shared/p\nenv: {A: 1}\n")
    hosts = load_hosts(allocation / "h.yaml")
    assert [h.name for h in hosts.hosts] == ["node-b", "node-a"]
    assert [h.name for h in hosts.spares] == ["node-c"]
    first = hosts.hosts[0]
    assert (first.nproc_per_node, first.python, first.workdir, dict(first.env)) == (
        4, "/shared/venv/bin/python", "/shared/p", {"A": "1"})
    assert hosts.slurm is not None
    assert (hosts.slurm.partition, hosts.slurm.time, hosts.slurm.gpus_per_node, hosts.slurm.sbatch_args) == (
        "gpu", "02:00:00", 8, ("--account=proj",))


def test_more_nodes_than_the_allocation_has_is_refused(allocation: Path) -> None:
    (allocation / "h.yaml").write_text("slurm: {nodes: 4}\n")
    with pytest.raises(HostsFileError, match=r"h.yaml: slurm.nodes: asks for 4 nodes.*has 3"):
        load_hosts(allocation / "h.yaml")


@pytest.mark.parametrize("data, where", [
    ({"slurm": {"nodes": 0}}, "slurm.nodes: must be a positive integer"),
    ({"slurm": {"node": 2}}, "slurm.node: unknown key; did you mean `nodes`?"),
    ({"slurm": {"time": "2 hours"}}, "slurm.time: must be a Slurm time"),
    ({"slurm": {"gpus_per_node": "8"}}, "slurm.gpus_per_node: must be a positive integer"),
    ({"slurm": {"sbatch_args": "--exclusive"}}, "slurm.sbatch_args: must be a list"),
    ({"slurm": [2]}, "slurm: must be a mapping"),
    ({"slurm": {}, "hosts": ["a"]}, "hosts: cannot be used with `slurm:`"),
    ({"slurm": {}, "transport": "openssh"}, "transport: cannot be used with `slurm:`"),
    ({"slurm": {}, "nproc_per_node": "four"}, "nproc_per_node: must be a positive integer"),
])
def test_bad_slurm_sections_name_the_field(data, where) -> None:
    with pytest.raises(HostsFileError) as e:
        parse_hosts(data, "h.yaml")
    assert str(e.value).startswith("h.yaml: " + where), str(e.value)
