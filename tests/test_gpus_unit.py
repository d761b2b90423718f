"""GPUs without GPUs: `gpus:` lists, `nproc_per_node: gpu`, the plan with counts learned at
start, the inventory a node reports (from a stand-in nvidia-smi) and what in it stops a run.

The same logic runs against the sshd test cluster in test_gpu_e2e.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

import fakegpu
from clusterrun import nodeagent
from clusterrun.cli import main
from clusterrun.dryrun import render_plan
from clusterrun.errors import EXIT_USAGE, UsageError
from clusterrun.gpus import describe, missing_devices, parse_devices
from clusterrun.hostsfile import HostsFileError, parse_hosts
from clusterrun.run.inventory import Inventory, driver_differences, gpu_count, mismatches, node_problems
from clusterrun.options import LaunchOptions
from clusterrun.plan import Plan, make_plan, needs_gpu_count
from clusterrun.run.preflight import judge


def hosts(data) -> object:
    return parse_hosts(data, "hosts.yaml")


def plan_for(data, opts: LaunchOptions | None = None, gpu_counts=None) -> Plan:
    return make_plan(hosts(data), opts or LaunchOptions("train.py"), run_id="r1", master_addr="10.0.0.1",
                     master_port=29500, controller_python="/usr/bin/python3", local_home="/tmp/crh",
                     gpu_counts=gpu_counts)


def parse_error(data) -> str:
    with pytest.raises(HostsFileError) as info:
        hosts(data)
    assert info.value.exit_code == EXIT_USAGE
    return str(info.value)


# --- device lists ------------------------------------------------------------------


@pytest.mark.parametrize("value, devices", [
    ([0, 1], (0, 1)),
    ("4-7", (4, 5, 6, 7)),
    ("0,2,4-5", (0, 2, 4, 5)),
    (3, (3,)),
    (["0-1", 6], (0, 1, 6)),
    ([3, 1], (3, 1)),                   # the order written: local rank 0 gets GPU 3
    (" 0 - 1 ", (0, 1)),
])
def test_device_lists(value, devices):
    assert parse_devices(value) == devices


@pytest.mark.parametrize("value, says", [
    ([], "lists no GPU"),
    ("", "bad GPU index or range ''"),
    ("a-b", "bad GPU index or range 'a-b'"),
    ("7-4", "bad GPU range '7-4'"),
    ([0, 0], "GPU 0 is listed twice"),
    ([1, 2, 1, 2], "GPUs 1, 2 are listed twice"),
    ("0-3,2", "GPU 2 is listed twice"),
    (-1, "GPU index -1 is not in 0-1023"),
    (True, "must be GPU indices"),
    ([{"a": 1}], "must be GPU indices"),
    (None, "must be GPU indices"),
])
def test_bad_device_lists(value, says):
    with pytest.raises(ValueError) as info:
        parse_devices(value)
    assert says in str(info.value)


def test_describe_and_missing():
    assert describe((0, 1, 2, 3)) == "0-3"
    assert describe((0, 2, 5, 6, 7)) == "0,2,5-7"
    assert missing_devices((0, 1), 2) is None
    assert missing_devices((4, 5), 4) == "gpus: 4-5: the node has 4 GPUs (0-3), so GPUs 4-5 are not there"
    assert missing_devices((1,), 0) == "gpus: 1: the node has no GPU, so GPU 1 is not there"


# --- the hosts file ------------------------------------------------------------------


def test_gpus_sets_nproc_and_is_kept_per_host():
    h = hosts({"hosts": [{"host": "a", "gpus": [0, 1]}, {"host": "b", "gpus": "4-7"}, "c"]}).hosts
    assert [(x.gpus, x.nproc_per_node) for x in h] == [((0, 1), 2), ((4, 5, 6, 7), 4), (None, 1)]


def test_top_level_gpus_is_every_hosts_default():
    h = hosts({"gpus": "0-3", "hosts": ["a", "b:2", {"host": "c", "gpus": [5]}]}).hosts
    assert [(x.gpus, x.nproc_per_node) for x in h] == [((0, 1, 2, 3), 4), ((0, 1, 2, 3), 2), ((5,), 1)]


def test_the_most_specific_level_decides_nproc():
    # A host's own gpus: beats the top level's nproc_per_node; at one level nproc_per_node wins.
    h = hosts({"nproc_per_node": 8, "hosts": [{"host": "a", "gpus": [0, 1]}, "b",
                                              {"host": "c", "gpus": "0-3", "nproc_per_node": 2}]}).hosts
    assert [x.nproc_per_node for x in h] == [2, 8, 2]


def test_nproc_per_node_gpu_everywhere_it_can_be_written():
    h = hosts({"nproc_per_node": "gpu", "hosts": ["a", "b:gpu", "c:2", {"host": "d", "nproc_per_node": 4},
                                                   {"host": "e", "gpus": [2, 3]}]}).hosts
    assert [x.nproc_per_node for x in h] == ["gpu", "gpu", 2, 4, 2]     # gpu with gpus: is their number


@pytest.mark.parametrize("data, says", [
    ({"hosts": [{"host": "a", "gpus": "x"}]}, "hosts.yaml: hosts[0].gpus: bad GPU index or range 'x': use 0, 4-7 or 0,2,4-5"),
    ({"gpus": [1, 1], "hosts": ["a"]}, "hosts.yaml: gpus: GPU 1 is listed twice"),
    ({"hosts": [{"host": "a", "gpus": [0], "nproc_per_node": 2}]},
     "hosts.yaml: hosts[0]: nproc_per_node 2 is more than the 1 GPU of `gpus: 0` (NCCL refuses two ranks on one GPU)"),
    ({"hosts": [{"host": "a", "gpus": [0], "env": {"CUDA_VISIBLE_DEVICES": "1"}}]},
     "hosts.yaml: hosts[0]: `gpus:` sets CUDA_VISIBLE_DEVICES, and `env:` sets it too: keep one"),
    ({"hosts": [{"host": "a", "nproc_per_node": "gpus"}]},
     "hosts.yaml: hosts[0].nproc_per_node: must be a positive integer or `gpu`, got 'gpus'"),
    ({"hosts": [{"host": "a", "gpu": [0]}]}, "hosts.yaml: hosts[0].gpu: unknown key; did you mean `gpus`?"),
])
def test_gpu_mistakes_in_the_hosts_file(data, says):
    assert parse_error(data) == says


# --- the plan --------------------------------------------------------------------------


def test_gpus_become_cuda_visible_devices_in_nvidia_smi_order():
    plan = plan_for({"hosts": [{"host": "a", "gpus": [4, 5]}, "b"]})
    a, b = plan.nodes
    assert a.env["CUDA_VISIBLE_DEVICES"] == "4,5" and a.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "--nproc-per-node=2" in a.argv
    assert "CUDA_VISIBLE_DEVICES" not in b.env and "CUDA_DEVICE_ORDER" not in b.env
    assert plan.world_size == 3 and plan.complete


def test_a_users_cuda_device_order_is_kept():
    plan = plan_for({"hosts": [{"host": "a", "gpus": [0], "env": {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}}]})
    assert plan.nodes[0].env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_gpu_counts_unknown_leave_the_plan_pending():
    plan = plan_for({"hosts": ["a:gpu", "b:2", "c:gpu"]})
    assert not plan.complete
    assert [n.gpu_count_pending for n in plan.nodes] == [True, False, True]
    assert "--nproc-per-node=gpu" in plan.nodes[0].argv        # pasted by hand, torchrun counts them
    assert needs_gpu_count(hosts({"hosts": ["a:gpu", "b:2", "c:gpu"]}), LaunchOptions("x")) == [0, 2]


def test_ranks_follow_the_counts_found():
    plan = plan_for({"hosts": ["a:gpu", "b:2", "c:gpu"]}, gpu_counts={0: 8, 2: 4})
    assert plan.complete and plan.world_size == 14
    assert [(n.nproc, n.ranks) for n in plan.nodes] == [(8, range(0, 8)), (2, range(8, 10)), (4, range(10, 14))]
    assert "--nproc-per-node=8" in plan.nodes[0].argv


def test_nproc_per_node_gpu_on_the_command_line():
    data = {"hosts": ["a:2", {"host": "b", "gpus": "0-2"}]}
    plan = plan_for(data, LaunchOptions("x", nproc_per_node="gpu"), gpu_counts={0: 1})
    assert [n.nproc for n in plan.nodes] == [1, 3]              # b: one per GPU of its gpus:
    assert needs_gpu_count(hosts(data), LaunchOptions("x", nproc_per_node="gpu")) == [0]


@pytest.mark.parametrize("data, opts, counts, says", [
    ({"hosts": ["a:gpu"]}, LaunchOptions("x"), {0: 0}, "a: nproc_per_node is `gpu`, but the node has no GPU"),
    ({"hosts": [{"host": "a", "gpus": [0, 1]}]}, LaunchOptions("x", nproc_per_node=4), None,
     "a: --nproc-per-node 4 is more than the 2 GPUs of its `gpus: 0-1`"),
    ({"hosts": [{"host": "a", "gpus": [0]}]}, LaunchOptions("x", env={"CUDA_VISIBLE_DEVICES": "1"}), None,
     "a: `gpus:` sets CUDA_VISIBLE_DEVICES, and --env sets it too: keep one"),
])
def test_plan_errors(data, opts, counts, says):
    with pytest.raises(UsageError) as info:
        plan_for(data, opts, counts)
    assert str(info.value) == says and info.value.exit_code == EXIT_USAGE


def test_plan_json_keeps_gpus():
    import dataclasses

    from clusterrun.plan import plan_from_dict

    plan = plan_for({"hosts": [{"host": "a", "gpus": [1]}, "b:gpu"]}, gpu_counts={1: 2})
    again = plan_from_dict(json.loads(json.dumps(dataclasses.asdict(plan))))
    assert again == plan


# --- the dry run ---------------------------------------------------------------------


def test_dry_run_shows_gpu_counts_as_unknown_and_the_ranks_they_move():
    text = render_plan(plan_for({"env": {"NCCL_DEBUG": "INFO"},
                                 "hosts": ["a:2", "b:gpu", {"host": "c", "gpus": "4-5"}]}))
    lines = text.splitlines()
    assert lines[0] == "3 nodes, world size ?, MASTER_ADDR=10.0.0.1 MASTER_PORT=29500"
    assert lines[2:6] == [
        "node  node_rank  nproc  global ranks  ssh target",
        "a             0      2           0-1  a",
        "b             1      ?             ?  b",
        "c             2      2             ?  c",
    ]
    assert ("# ? is known only at start: nproc_per_node is gpu on b, one process per GPU, counted with "
            "nvidia-smi in the preflight; the global ranks from there on follow from the counts. Pasted by "
            "hand, torchrun counts them itself (--nproc-per-node=gpu).") in lines
    assert "# gpus: c uses GPUs 4-5 (CUDA_VISIBLE_DEVICES=4,5 and CUDA_DEVICE_ORDER=PCI_BUS_ID)." in lines
    assert ("# NCCL on every node: set by you (env:, --env): NCCL_DEBUG=INFO; set by clusterrun: "
            "NCCL_SOCKET_IFNAME (the interface that reaches MASTER_ADDR, picked on the node).") in lines
    assert "# node 1 (b): global ranks ?" in lines and "# node 0 (a): global ranks 0-1" in lines


def test_dry_run_names_the_nodes_whose_nccl_settings_differ():
    text = render_plan(plan_for({"hosts": ["a", {"host": "b", "env": {"NCCL_SOCKET_IFNAME": "ib0",
                                                                      "NCCL_IB_HCA": "mlx5_0"}}]},
                                LaunchOptions("x", env={"NCCL_DEBUG": "WARN"})))
    assert ("# NCCL on a: set by you (env:, --env): NCCL_DEBUG=WARN; set by clusterrun: NCCL_SOCKET_IFNAME "
            "(the interface that reaches MASTER_ADDR, picked on the node).") in text.splitlines()
    assert ("# NCCL on b: set by you (env:, --env): NCCL_DEBUG=WARN, NCCL_IB_HCA=mlx5_0, NCCL_SOCKET_IFNAME=ib0; "
            "set by clusterrun: none.") in text.splitlines()


def test_dry_run_cli_with_gpu_counts(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts: [localhost]\n")
    r = CliRunner().invoke(main, ["up", "--dry-run", "--nproc-per-node", "gpu", str(p), "train.py"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("1 node, world size ?, ")
    r = CliRunner().invoke(main, ["up", "--dry-run", "--nproc-per-node", "gpus", str(p), "train.py"])
    assert r.exit_code == 2 and "expected a positive integer or gpu, got 'gpus'" in r.output


# --- the inventory and what in it stops a run --------------------------------------------


def probe(gpus: int = 0, *, python="3.11.7", torch="2.4.0+cu121", cuda="12.1", nccl="2.20.5",
          driver="550.54.15", driver_cuda="12.4", processes=(), smi=True) -> dict:
    r = {"python": python, "versions": {"torch": torch, "cuda": cuda, "nccl": nccl}, "ifname": "eth0",
         "smi": {"found": smi}}
    if smi:
        r["smi"].update(driver=driver, driver_cuda=driver_cuda, processes=list(processes),
                        gpus=[{"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA A100-SXM4-80GB",
                               "memory_total": 81920, "memory_used": 0} for i in range(gpus)])
    return r


def test_inventory_from_the_probe():
    inv = Inventory.from_probe(probe(2, processes=[{"gpu": 1, "pid": 42, "memory": 2048, "name": "python"}]))
    assert (inv.count, inv.model(), inv.driver, inv.driver_cuda, inv.cuda, inv.nccl, inv.torch) == (
        2, "2 x NVIDIA A100-SXM4-80GB", "550.54.15", "12.4", "12.1", "2.20.5", "2.4.0+cu121")
    assert inv.processes[0].pid == 42 and inv.processes[0].gpu == 1
    none = Inventory.from_probe(probe(smi=False))
    assert none.count == 0 and none.why_none() == "nvidia-smi is not on its PATH"


@pytest.mark.parametrize("data, inv, says", [
    ({"hosts": ["a:4"]}, probe(2), ["2 GPUs < nproc_per_node 4"]),
    ({"hosts": ["a:4"]}, probe(0, smi=False), []),                      # CPU only: gloo
    ({"hosts": ["a:gpu"]}, probe(0, smi=False),
     ["nproc_per_node is `gpu`, but the node has no GPU (nvidia-smi is not on its PATH)"]),
    ({"hosts": ["a:gpu"]}, probe(0), ["nproc_per_node is `gpu`, but the node has no GPU (nvidia-smi lists none)"]),
    ({"hosts": [{"host": "a", "nproc_per_node": "gpu", "env": {"CUDA_VISIBLE_DEVICES": "5"}}]}, probe(2),
     ["nproc_per_node is `gpu`, but the node has no GPU (none of its 2 is in CUDA_VISIBLE_DEVICES=5)"]),
    ({"hosts": [{"host": "a", "gpus": "2-3"}]}, probe(3),
     ["gpus: 2-3: the node has 3 GPUs (0-2), so GPU 3 is not there"]),
    ({"hosts": [{"host": "a", "gpus": [0]}]}, probe(0, smi=False),
     ["gpus: 0: the node has no GPU, so GPU 0 is not there (nvidia-smi is not on its PATH)"]),
    ({"hosts": ["a:2"]}, probe(2, driver_cuda="11.4"),
     ["driver 550.54.15 runs CUDA up to 11.4, but torch is built for CUDA 12.1 (update the driver, "
      "or install a torch for CUDA 11)"]),
    ({"hosts": ["a:2"]}, probe(2), []),
])
def test_node_problems(data, inv, says):
    plan = plan_for(data)
    assert node_problems(plan.nodes[0], Inventory.from_probe(inv)) == says


def test_the_gpu_count_honours_a_users_cuda_visible_devices():
    plan = plan_for({"hosts": [{"host": "a", "nproc_per_node": "gpu", "env": {"CUDA_VISIBLE_DEVICES": "1,3,9"}}]})
    assert gpu_count(plan.nodes[0], Inventory.from_probe(probe(4))) == 2


@pytest.mark.parametrize("field, values, odd, says", [
    ("torch", ["2.4.0", "2.4.0", "2.3.1"], 2, "torch 2.3.1 differs from 2.4.0 on n0, n1"),
    ("nccl", ["2.20.5", "2.18.1", "2.20.5"], 1, "NCCL 2.18.1 differs from 2.20.5 on n0, n2"),
    ("cuda", ["12.1", "11.8", "12.4"], 1, "torch's CUDA 11.8 differs from 12.x on n0, n2"),
    ("python", ["3.11.7", "3.11.9", "3.10.12"], 2, "Python 3.10.12 differs from 3.11.x on n0, n1"),
])
def test_each_mismatch_is_named_on_the_node_that_differs(field, values, odd, says):
    plan = plan_for({"hosts": ["n0", "n1", "n2"]})
    invs = []
    for v in values:
        p = probe(1)
        if field == "python":
            p["python"] = v
        else:
            p["versions"][field] = v
        invs.append(Inventory.from_probe(p))
    assert mismatches(list(zip(plan.nodes, invs))) == {odd: [says]}


def test_on_a_tie_the_first_nodes_value_is_taken_as_right():
    plan = plan_for({"hosts": ["n0", "n1"]})
    invs = [Inventory.from_probe(probe(1, torch="2.4.0")), Inventory.from_probe(probe(1, torch="2.3.1"))]
    assert mismatches(list(zip(plan.nodes, invs))) == {1: ["torch 2.3.1 differs from 2.4.0 on n0"]}


def test_unknown_values_are_not_compared_and_drivers_only_noted():
    plan = plan_for({"hosts": ["n0", "n1", "n2"]})
    invs = [Inventory.from_probe(probe(1, nccl=None, driver="535.104.05")),
            Inventory.from_probe(probe(1, driver="550.54.15")),
            Inventory.from_probe(probe(1, driver="550.54.15"))]
    pairs = list(zip(plan.nodes, invs))
    assert mismatches(pairs) == {}
    assert driver_differences(pairs) == {0: "driver 535.104.05 differs from 550.54.15 on n1, n2"}


def test_judge_gives_counts_warnings_and_every_problem_with_its_node():
    plan = plan_for({"hosts": ["n0:gpu", "n1:gpu", "n2:2"]})
    results = [probe(2, processes=[{"gpu": 1, "pid": 4242, "memory": 20480, "name": "python"}]),
               probe(1, torch="2.3.1"), "setup failed with exit code 1: oops"]
    v = judge(plan, results, LaunchOptions("train.py"), 29500)
    assert v.gpu_counts == {0: 2, 1: 1}
    assert v.warnings == ["n0: GPU 1: 20480 MiB in use by pid 4242 (python)"]
    assert v.problems == ["n1: torch 2.3.1 differs from 2.4.0+cu121 on n0", "n2: setup failed with exit code 1: oops"]
    # --skip-check: only what the plan needs, the GPU counts
    v = judge(plan, [probe(0, smi=False), probe(1, torch="2.3.1"), "down"], LaunchOptions("train.py"), 29500,
              checks=False)
    assert v.problems == ["n0: nproc_per_node is `gpu`, but the node has no GPU (nvidia-smi is not on its PATH)"]


# --- the node agent's side: nvidia-smi and torch's files --------------------------------


def test_the_probe_reads_a_stand_in_nvidia_smi(tmp_path):
    smi = fakegpu.install(tmp_path / "bin", [{"name": "NVIDIA H100 80GB HBM3", "used": 20500}, {}],
                          processes=[{"gpu": 0, "pid": 4242, "memory": 20480, "name": "/usr/bin/python3"}],
                          driver="535.104.05", cuda="12.2")
    got = nodeagent.gpu_inventory({"PATH": f"{smi}{os.pathsep}{os.environ['PATH']}"})
    assert got["driver"] == "535.104.05" and got["driver_cuda"] == "12.2"
    assert [(g["index"], g["name"], g["memory_used"]) for g in got["gpus"]] == [
        (0, "NVIDIA H100 80GB HBM3", 20500), (1, "NVIDIA H100 80GB HBM3", 0)]
    assert got["processes"] == [{"gpu": 0, "pid": 4242, "memory": 20480, "name": "/usr/bin/python3"}]


def test_the_probe_without_nvidia_smi_or_when_it_fails(tmp_path):
    assert nodeagent.gpu_inventory({"PATH": str(tmp_path)}) == {"found": False}
    smi = fakegpu.install(tmp_path / "bin", fail="NVIDIA-SMI has failed because it couldn't communicate "
                                                 "with the NVIDIA driver.")
    got = nodeagent.gpu_inventory({"PATH": str(smi)})
    assert got["error"] == ("nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't "
                            "communicate with the NVIDIA driver.")
    assert Inventory.from_probe({"smi": got}).why_none() == got["error"]


def test_torch_versions_from_its_files_without_importing_it(tmp_path):
    root = tmp_path / "site-packages" / "torch"
    root.mkdir(parents=True)
    (root / "version.py").write_text("from typing import Optional\n__version__ = '2.4.0+cu121'\n"
                                     "debug = False\ncuda: Optional[str] = '12.1'\n")
    (tmp_path / "site-packages" / "nvidia_nccl_cu12-2.20.5.dist-info").mkdir()
    assert nodeagent.torch_file_versions(str(root)) == {"torch": "2.4.0+cu121", "cuda": "12.1", "nccl": "2.20.5"}
    (root / "version.py").write_text("__version__ = '2.4.0+cpu'\ncuda = None\n")
    assert nodeagent.torch_file_versions(str(root)) == {"torch": "2.4.0+cpu", "cuda": None, "nccl": None}
    assert nodeagent.nccl_code(22005) == "2.20.5" and nodeagent.nccl_code(2708) == "2.7.8"


# --- check on localhost nodes (no SSH): the stand-in nvidia-smi through setup: ------------------


@pytest.mark.e2e       # the probe imports torch on both nodes: seconds, not the fast tier's milliseconds
def test_check_json_on_localhost_with_a_stand_in_nvidia_smi(tmp_path, monkeypatch):
    smi = fakegpu.install(tmp_path / "bin", 2, processes=[{"gpu": 1, "pid": 4242, "memory": 1024}])
    p = tmp_path / "hosts.yaml"
    p.write_text(f"master_port: auto\nsetup: export PATH={smi}:$PATH\npython: {sys.executable}\n"
                 "hosts:\n  - host: localhost\n    nproc_per_node: gpu\n  - host: localhost\n    gpus: [1]\n")
    monkeypatch.setenv("CLUSTERRUN_HOME", str(tmp_path / "crh"))
    r = CliRunner().invoke(main, ["check", "--json", str(p)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["world_size"] == 3 and data["ok"] is True
    n0, n1 = data["nodes"]
    assert (n0["gpu_count"], n0["nproc"], n0["gpu_model"], n0["driver"], n0["driver_cuda"]) == (
        2, 2, "2 x NVIDIA H100 80GB HBM3", "550.54.15", "12.4")
    assert n0["gpu_processes"] == [{"gpu": 1, "pid": 4242, "memory": 1024, "name": "python"}]
    assert n0["warnings"] == ["GPU 1: 1024 MiB in use by pid 4242 (python)"]
    assert (n1["nproc"], n1["cuda_visible_devices"]) == (1, "1")
    import torch
    assert n0["torch"] == torch.__version__ and n0["python"] == ".".join(map(str, sys.version_info[:3]))
