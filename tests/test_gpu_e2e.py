"""End-to-end: GPUs on the sshd test cluster, with a stand-in nvidia-smi per node (tests/fakegpu.py).

The nodes share this machine's files, so each node gets its own fake (a directory put first
on its PATH through the hosts file's `setup:` or `env:`), reporting what the test says:
how many GPUs, the driver, the processes holding GPU memory. The jobs run on CPU (gloo);
what is checked is what clusterrun makes of the counts: the ranks, world size and
CUDA_VISIBLE_DEVICES each worker sees, the inventory `check` shows, and every mismatch
refused before anything starts, naming its node.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import fakegpu
from kit import TAG, assert_nothing_left, hosts_file, up, write

pytestmark = [pytest.mark.e2e, pytest.mark.transports("paramiko")]

REPORT = """\
    import json, os, socket
    import torch.distributed as dist
    dist.init_process_group("gloo")
    print("REPORT " + json.dumps({
        "rank": dist.get_rank(), "world": dist.get_world_size(), "local_rank": int(os.environ["LOCAL_RANK"]),
        "hostname": socket.gethostname(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "order": os.environ.get("CUDA_DEVICE_ORDER"),
    }))
    dist.barrier()
"""



def on_path(directory: Path) -> str:
    """A `setup:` line that puts the fake nvidia-smi first on the node's PATH."""
    return f"export PATH={directory}:$PATH"


def reports(stdout: str) -> dict[int, tuple[dict, dict]]:
    """global rank -> (tag fields, the worker's own report)."""
    out = {}
    for line in stdout.splitlines():
        m = TAG.match(line)
        if m and m["text"].startswith("REPORT "):
            r = json.loads(m["text"][len("REPORT "):])
            out[r["rank"]] = (m.groupdict(), r)
    return out


def rows(stdout: str, prefix: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines() if line.startswith(prefix)}


def test_check_shows_every_nodes_inventory(cluster, ctl, tmp_path):
    a, b = cluster.names[:2]
    smi_a = fakegpu.install(tmp_path / "a", 2, processes=[{"gpu": 1, "pid": 4242, "memory": 20480}])
    smi_b = fakegpu.install(tmp_path / "b", [{"name": "NVIDIA A100-SXM4-80GB", "total": 81920}],
                            driver="535.104.05", cuda="12.2")
    hosts = hosts_file(tmp_path, [{"host": a, "setup": on_path(smi_a)},
                                  {"host": b, "env": {"PATH": f"{smi_b}:{os.environ['PATH']}"}}],
                       nproc_per_node="gpu")
    r = ctl.run("check", str(hosts))
    assert r.returncode == 0, r.stdout + r.stderr
    import torch

    assert r.stdout.splitlines()[0] == f"MASTER_ADDR {cluster.addrs[0]}, master port {hosts_master_port(hosts)}, world size 3"
    got = rows(r.stdout, cluster.prefix + "-n")
    assert set(got) == {a, b}
    for row in got.values():
        assert torch.__version__ in row and " eth0 " in row and row.endswith("ok")
    assert "550.54.15 (CUDA 12.4)" in got[a] and "2 x NVIDIA H100 80GB HBM3" in got[a] and " 2 (gpu) " in got[a]
    assert "20.0 GiB, pid 4242" in got[a]
    assert "535.104.05 (CUDA 12.2)" in got[b] and "1 x NVIDIA A100-SXM4-80GB" in got[b] and " 1 (gpu) " in got[b]
    assert f"clusterrun: warning: {a}: GPU 1: 20480 MiB in use by pid 4242 (python)" in r.stdout.splitlines()
    assert f"clusterrun: warning: {b}: driver 535.104.05 differs from 550.54.15 on {a}" in r.stdout.splitlines()

    r = ctl.run("check", "--json", str(hosts))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] is True and data["world_size"] == 3 and data["master_addr"] == cluster.addrs[0]
    na, nb = data["nodes"]
    assert (na["node"], na["hostname"], na["gpu_count"], na["nproc"], na["interface"]) == (a, a, 2, 2, "eth0")
    assert na["gpus"][1] == {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total": 81559, "memory_used": 0}
    assert na["gpu_processes"] == [{"gpu": 1, "pid": 4242, "memory": 20480, "name": "python"}]
    assert (nb["driver"], nb["driver_cuda"], nb["gpu_model"], nb["nproc"]) == (
        "535.104.05", "12.2", "1 x NVIDIA A100-SXM4-80GB", 1)
    for n in (na, nb):
        assert n["torch"] == torch.__version__ and n["nvidia_smi"] == "found" and n["problems"] == []
        assert n["cuda"] is None and n["nccl"] is None       # this machine's torch is a CPU build


def hosts_master_port(path: Path) -> int:
    import yaml

    return yaml.safe_load(path.read_text())["master_port"]


def test_a_node_with_fewer_gpus_than_nproc_fails_check_and_up_before_anything_starts(cluster, ctl, tmp_path):
    a, b = cluster.names[:2]
    smi_a, smi_b = fakegpu.install(tmp_path / "a", 2), fakegpu.install(tmp_path / "b", 1)
    hosts = hosts_file(tmp_path, [{"host": a, "setup": on_path(smi_a)}, {"host": b, "setup": on_path(smi_b)}],
                       nproc_per_node=2)
    r = ctl.run("check", str(hosts))
    assert r.returncode == 1, r.stdout + r.stderr
    got = rows(r.stdout, cluster.prefix + "-n")
    assert got[a].endswith("ok") and got[b].endswith("FAIL")
    assert f"clusterrun: {b}: 1 GPU < nproc_per_node 2" in r.stdout.splitlines()

    marker = tmp_path / "started"
    script = write(tmp_path / "touch.py", f"open({str(marker)!r}, 'a').write('x')\n")
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.splitlines()[-3:] == ["clusterrun: preflight failed, nothing was started:",
                                          f"  {b}: 1 GPU < nproc_per_node 2",
                                          "(--skip-check skips these checks)"]
    assert not marker.exists() and r.stdout == ""
    assert_nothing_left(cluster)


def test_nproc_per_node_gpu_runs_one_rank_per_gpu_each_node_has(cluster, tmp_path):
    a, b = cluster.names[:2]
    smi_a, smi_b = fakegpu.install(tmp_path / "a", 2), fakegpu.install(tmp_path / "b", 1)
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [{"host": a, "setup": on_path(smi_a)}, {"host": b, "setup": on_path(smi_b)}],
                       nproc_per_node="gpu")
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 nodes, 3 ranks" in r.stderr
    got = reports(r.stdout)
    assert sorted(got) == [0, 1, 2]
    for rank, (tag, rep) in got.items():
        assert rep["world"] == 3 and int(tag["g"]) == rank and int(tag["l"]) == rep["local_rank"]
        assert tag["node"] == rep["hostname"] == (a if rank < 2 else b)
        assert rep["cvd"] is None           # all of the node's GPUs: nothing to hide
    assert_nothing_left(cluster)


def test_gpus_set_cuda_visible_devices_and_nproc(cluster, tmp_path):
    a, b = cluster.names[:2]
    smi = fakegpu.install(tmp_path / "smi", 4)
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [{"host": a, "gpus": [1]}, {"host": b, "gpus": "2-3"}], setup=on_path(smi))
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    got = reports(r.stdout)
    assert sorted(got) == [0, 1, 2]
    assert [(got[g][0]["node"], got[g][1]["cvd"], got[g][1]["world"]) for g in range(3)] == [
        (a, "1", 3), (b, "2,3", 3), (b, "2,3", 3)]
    assert {rep["order"] for _, rep in got.values()} == {"PCI_BUS_ID"}   # indices as nvidia-smi numbers them
    assert_nothing_left(cluster)


def test_a_gpus_index_the_node_lacks_fails_before_start(cluster, tmp_path):
    a, b = cluster.names[:2]
    smi = fakegpu.install(tmp_path / "smi", 2)
    marker = tmp_path / "started"
    script = write(tmp_path / "touch.py", f"open({str(marker)!r}, 'a').write('x')\n")
    hosts = hosts_file(tmp_path, [{"host": a, "gpus": [0]}, {"host": b, "gpus": [1, 3]}], setup=on_path(smi))
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"  {b}: gpus: 1,3: the node has 2 GPUs (0-1), so GPU 3 is not there" in r.stderr.splitlines()
    assert not any(l.startswith(f"  {a}:") for l in r.stderr.splitlines())
    assert not marker.exists()
    assert_nothing_left(cluster)


def test_gpu_without_nvidia_smi_is_a_clear_error(cluster, tmp_path):
    a, b = cluster.names[:2]
    smi = fakegpu.install(tmp_path / "smi", 1)
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [{"host": a, "setup": on_path(smi)}, b], nproc_per_node="gpu")
    want = f"  {b}: nproc_per_node is `gpu`, but the node has no GPU (nvidia-smi is not on its PATH)"
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 2, r.stdout + r.stderr
    assert want in r.stderr.splitlines() and "Traceback" not in r.stderr
    # --skip-check skips the checks, but a count is needed to plan: the same error, without the hint.
    r = up(cluster, tmp_path, "--skip-check", str(hosts), str(script))
    assert r.returncode == 2, r.stdout + r.stderr
    assert want in r.stderr.splitlines() and "--skip-check skips" not in r.stderr
    assert_nothing_left(cluster)
