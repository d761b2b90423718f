"""End-to-end: what a real cluster needs, on the sshd test cluster.

check, exec, env at every level with setup/python/workdir per host, --sync,
host ranges, an automatic master port, and the preflight that stops a run
before anything starts.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from kit import REPORT, assert_nothing_left, hosts_file, reports, write

pytestmark = pytest.mark.e2e



def test_check_healthy_nodes(cluster, ctl, tmp_path):
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = ctl.run("check", str(hosts))
    assert r.returncode == 0, r.stdout + r.stderr
    import torch

    rows = {l.split()[0]: l for l in r.stdout.splitlines() if l.startswith(f"{cluster.prefix}-n")}
    assert set(rows) == set(cluster.names[:2])
    for row in rows.values():
        assert torch.__version__ in row and "CPU only" in row and "eth0" in row and row.endswith("ok")
    assert "free" in rows[cluster.names[0]]          # the master port, checked on node 0


def test_check_names_an_unreachable_node(cluster, ctl, tmp_path):
    hosts = hosts_file(tmp_path, [cluster.names[0], {"host": cluster.names[1], "port": 2222}],
                       connect_timeout=3)
    r = ctl.run("check", str(hosts), timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"clusterrun: {cluster.names[1]}: " in r.stdout and "refused" in r.stdout
    row0 = next(l for l in r.stdout.splitlines() if l.startswith(cluster.names[0]))
    assert row0.endswith("ok")


def test_exec_tags_lines_by_node_and_names_failures(cluster, ctl, tmp_path):
    marker = tmp_path / "pwned"
    hosts = hosts_file(tmp_path, cluster.names[:3])
    r = ctl.run("exec", str(hosts), "--", "sh", "-c",
                f'echo "on $(hostname)"; echo "to stderr" >&2; [ "$(hostname)" != {cluster.names[1]} ] || exit 4')
    assert r.returncode == 1
    for name in cluster.names[:3]:
        assert f"[{name}] on {name}" in r.stdout.splitlines()
        assert f"[{name}] to stderr" in r.stdout.splitlines()
    assert f"failed on 1 of 3 nodes: {cluster.names[1]} (exit 4)" in r.stderr
    # A line redrawn with \r (a download's progress bar) shows as its last redraw.
    bar = ctl.run("exec", str(hosts), "--", "printf", "\r 10%%\r 50%%\r100%% done\n")
    assert sorted(bar.stdout.split("\n")) == ["", *(f"[{n}] 100% done" for n in cluster.names[:3])], bar.stdout
    # Arguments arrive literally: nothing is run by a shell that was not asked for.
    ok = ctl.run("exec", str(hosts), "--", "printf", "%s|", "a b", f"$(touch {marker})", "it's")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(f"a b|$(touch {marker})|it's|") == 3
    assert not marker.exists()


def test_exec_names_a_node_whose_setup_fails_and_runs_on_the_others(cluster, ctl, tmp_path):
    good, bad = cluster.names[:2]
    hosts = hosts_file(tmp_path, [good, {"host": bad, "setup": ["echo preparing", "ls /clusterrun-no-such-dir"]}])
    r = ctl.run("exec", str(hosts), "--", "sh", "-c", "echo ran on $(hostname)")
    assert r.returncode == 1, r.stdout + r.stderr        # as docs/commands.md says: it failed somewhere
    assert f"[{good}] ran on {good}" in r.stdout.splitlines()
    assert f"[{bad}] preparing" in r.stdout.splitlines() and f"ran on {bad}" not in r.stdout
    assert r.stderr.splitlines() == [
        "clusterrun: sh -c 'echo ran on $(hostname)' did not start on 1 of 2 nodes:",
        # stdout and stderr are merged in exec: the last lines are the setup's, of both
        f"  {bad}: setup failed with exit code 2: preparing | ls: cannot access '/clusterrun-no-such-dir': "
        "No such file or directory"]


def test_exec_runs_on_the_reachable_nodes_and_names_the_unreachable_one(cluster, ctl, tmp_path):
    """Like pdsh: one node down does not keep the command from the others; exit 3 says so."""
    down = {"host": cluster.names[1], "name": "down", "port": 2222}   # nothing listens there
    hosts = hosts_file(tmp_path, [cluster.names[0], down, cluster.names[2]], connect_timeout=3)
    r = ctl.run("exec", str(hosts), "--", "hostname", timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == [f"[{cluster.names[0]}] {cluster.names[0]}",
                                             f"[{cluster.names[2]}] {cluster.names[2]}"]
    assert "cannot reach 1 of 3 nodes (the command ran on the others)" in r.stderr
    assert "down: " in r.stderr and "refused" in r.stderr


def test_env_at_every_level_setup_python_and_workdir_per_host(cluster, ctl, tmp_path):
    wd1 = tmp_path / "work dir one"
    wd2 = tmp_path / "work'dir two"
    wd1.mkdir()
    wd2.mkdir()
    script = write(tmp_path / "env.py", """\
        import json, os
        keys = ["A", "B", "C", "D", "FROM_SETUP", "PYTHONUNBUFFERED", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"]
        print("ENV " + json.dumps({"rank": int(os.environ["RANK"]), "cwd": os.getcwd(),
                                  **{k: os.environ.get(k) for k in keys}}))
    """)
    hosts = hosts_file(tmp_path, [
        {"host": cluster.names[0], "workdir": str(wd1), "env": {"B": "host-one"},
         "setup": ["export FROM_SETUP=yes", "export D=from-setup", "export NCCL_SOCKET_IFNAME=ib9"]},
        {"host": cluster.names[1], "workdir": str(wd2), "python": sys.executable},
    ], env={"A": "top", "B": "top", "D": "top-$(id)"})
    r = ctl.run("up", "--env", "A=cli value 'quoted' $(touch x)", "--env", "C=cli",
                str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    got = {}
    for line in r.stdout.splitlines():
        if "] ENV " in line:
            e = json.loads(line.split("] ENV ", 1)[1])
            got[e["rank"]] = e
    # The hosts file's env wins over setup's exports; an interface the node's setup chose is kept.
    assert got[0] == {"rank": 0, "cwd": str(wd1), "A": "cli value 'quoted' $(touch x)", "B": "host-one",
                      "C": "cli", "D": "top-$(id)", "FROM_SETUP": "yes", "PYTHONUNBUFFERED": "1",
                      "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib9"}
    assert got[1] == {"rank": 1, "cwd": str(wd2), "A": "cli value 'quoted' $(touch x)", "B": "top",
                      "C": "cli", "D": "top-$(id)", "FROM_SETUP": None, "PYTHONUNBUFFERED": "1",
                      "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert not (wd1 / "x").exists() and not (wd2 / "x").exists()


def test_a_setup_block_with_comments_works_in_up_and_exec(cluster, ctl, tmp_path):
    block = "export FROM_SETUP=yes  # a comment\nif true; then\n  export D=from-block\nfi\n"
    hosts = hosts_file(tmp_path, cluster.names[:2], setup=block)
    r = ctl.run("exec", str(hosts), "--", "sh", "-c", 'echo "$FROM_SETUP $D"')
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == [f"[{n}] yes from-block" for n in cluster.names[:2]]
    script = write(tmp_path / "env.py", """\
        import os
        print("SETUP", os.environ["FROM_SETUP"], os.environ["D"])
    """)
    r = ctl.run("up", str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len([l for l in r.stdout.splitlines() if l.endswith("] SETUP yes from-block")]) == 2


def test_sync_copies_a_project_into_per_node_workdirs(cluster, ctl, tmp_path):
    proj = tmp_path / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "train.py").write_text(
        "import os\nfrom pkg.util import where\nprint('SYNCED', os.environ['RANK'], where())\n")
    (proj / "pkg" / "__init__.py").write_text("")
    (proj / "pkg" / "util.py").write_text("import os\ndef where():\n    return os.getcwd()\n")
    (proj / "data").mkdir()
    (proj / "data" / "big.bin").write_bytes(b"x" * 1000)
    (proj / ".gitignore").write_text("data/\n*.log\n")
    (proj / "run.log").write_text("noise")
    (proj / ".git").mkdir()
    (proj / ".git" / "HEAD").write_text("ref: x")
    (proj / "__pycache__").mkdir()
    (proj / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    dest = tmp_path / "remote"
    hosts = hosts_file(proj, [{"host": n, "workdir": str(dest / n)} for n in cluster.names[:2]])
    ctl.tmp = proj                                   # run from the project directory
    r = ctl.run("up", "--sync", str(hosts), "train.py")
    assert r.returncode == 0, r.stdout + r.stderr
    for i, n in enumerate(cluster.names[:2]):
        assert f"[{n} g{i} l0] SYNCED {i} {dest / n}" in r.stdout.splitlines()
        files = sorted(str(p.relative_to(dest / n)) for p in (dest / n).rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts)
        assert files == [".gitignore", "hosts.yaml", "pkg/__init__.py", "pkg/util.py", "train.py"]
    n1, n2 = cluster.names[:2]
    assert f"synced {n1} (5 files), {n2} (5 files)" in r.stderr
    # Unchanged files are not sent again; a changed one is.
    (proj / "pkg" / "util.py").write_text("import os\ndef where():\n    return 'v2 ' + os.getcwd()\n")
    r = ctl.run("up", "--sync", str(hosts), "train.py")
    assert r.returncode == 0, r.stderr
    assert f"synced {n1} (1 files), {n2} (1 files)" in r.stderr
    assert f"[{n1} g0 l0] SYNCED 0 v2 {dest / n1}" in r.stdout.splitlines()


def test_sync_logs_in_with_setup_and_sends_a_linked_file_as_that_file(cluster, ctl, tmp_path):
    """The hosts file's python is found only once setup: has run (a venv's activate), as in
    a run; config.yaml -> configs/base.yaml reaches the node as a file, and only once."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    write(venv / "cr-venv-python", f'#!/bin/sh\nexec {sys.executable} "$@"\n').chmod(0o755)
    (venv / "activate").write_text(f'export PATH="{venv}:$PATH"\n')
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "configs" / "base.yaml").write_text("lr: 0.1\n")
    (proj / "config.yaml").symlink_to("configs/base.yaml")
    (proj / "train.py").write_text("import os\nprint('CONFIG', os.environ['RANK'], open('config.yaml').read().strip())\n")
    dest = tmp_path / "remote"
    hosts = hosts_file(proj, [{"host": n, "workdir": str(dest / n / "my project")} for n in cluster.names[:2]],
                       python="cr-venv-python", setup=f"source {venv}/activate")
    ctl.tmp = proj                                   # run from the project directory
    r = ctl.run("up", "--sync", str(hosts), "train.py")
    assert r.returncode == 0, r.stdout + r.stderr
    n1, n2 = cluster.names[:2]
    assert f"synced {n1} (4 files), {n2} (4 files)" in r.stderr
    for i, n in enumerate(cluster.names[:2]):
        assert f"[{n} g{i} l0] CONFIG {i} lr: 0.1" in r.stdout.splitlines()
        linked = dest / n / "my project" / "config.yaml"
        assert linked.is_file() and not linked.is_symlink()
    r = ctl.run("up", "--sync", str(hosts), "train.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"synced {n1} (0 files), {n2} (0 files)" in r.stderr


def test_without_sync_a_missing_script_stops_the_run_before_it_starts(cluster, ctl, tmp_path):
    hosts = hosts_file(tmp_path, [{"host": n, "workdir": str(tmp_path / "empty")} for n in cluster.names[:2]])
    (tmp_path / "empty").mkdir()
    r = ctl.run("up", str(hosts), "train.py")
    assert r.returncode == 2, r.stdout + r.stderr
    for n in cluster.names[:2]:
        assert f"{n}: script 'train.py' not found in {tmp_path / 'empty'}" in r.stderr
    assert "nothing was started" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "crhome" / "runs").exists() or not list((tmp_path / "crhome" / "runs").iterdir())
    assert_nothing_left(cluster)


def test_a_host_range_and_an_automatic_master_port(cluster, ctl, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [f"{cluster.prefix}-n[2-3]"], nproc_per_node=1, master_port="auto")
    r = ctl.run("up", str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    got = reports(r.stdout)
    assert sorted((t["node"], int(t["g"])) for t, _ in got) == [(cluster.names[1], 0), (cluster.names[2], 1)]
    (run,) = (tmp_path / "crhome" / "runs").iterdir()
    port = json.loads((run / "plan.json").read_text())["master_port"]
    assert 1024 <= port <= 65535
    assert all(f"--master-port={port}" in n["argv"] for n in json.loads((run / "plan.json").read_text())["nodes"])


def test_lint_finds_rank_mistakes_and_up_warns_about_them(cluster, ctl, tmp_path):
    good = write(tmp_path / "good.py", """\
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        print("ok", dist.get_rank(), local_rank)
    """)
    bad = write(tmp_path / "bad.py", """\
        import os, torch, torch.distributed as dist
        from torch.utils.data import DistributedSampler
        dist.init_process_group("gloo", rank=0, world_size=2)
        rank = dist.get_rank()
        device = torch.device(f"cuda:{rank}")
        sampler = DistributedSampler(range(8), rank=int(os.environ["LOCAL_RANK"]))
        print("ran anyway", rank)
    """)
    r = ctl.run("lint", str(good))
    assert r.returncode == 0 and "no problems found" in r.stdout
    r = ctl.run("lint", str(bad))
    assert r.returncode == 1
    for line, code in ((3, "CR004"), (5, "CR001"), (6, "CR002")):
        assert re.search(rf"^{re.escape(str(bad))}:{line}:\d+: error {code} ", r.stdout, re.M), r.stdout
    # up prints the findings as warnings, then runs the script anyway.
    hosts = hosts_file(tmp_path, cluster.names[:1], nproc_per_node=1)
    ok = write(tmp_path / "warned.py", """\
        import os, torch
        device = torch.device("cuda", int(os.environ["RANK"]))
        print("started anyway")
    """)
    r = ctl.run("up", str(hosts), str(ok))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^clusterrun: warning: {re.escape(str(ok))}:2:\d+: error CR001 ", r.stderr, re.M), r.stderr
    assert f"[{cluster.names[0]} g0 l0] started anyway" in r.stdout.splitlines()
