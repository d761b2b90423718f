"""`up --sync` against a real node agent run here (LocalTransport, a real login shell):
the login line, what is sent, and what the node ends up with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from clusterrun.hostsfile import parse_hosts
from clusterrun.options import LaunchOptions
from clusterrun.plan import NodePlan, make_plan
from clusterrun.run.sync import SyncError, project_files, sync_node
from clusterrun.transports.local import LocalTransport


def local_node(tmp_path: Path, **entry) -> NodePlan:
    """A localhost node of its own, with this hosts entry (workdir, setup, python)."""
    hosts = parse_hosts({"hosts": [{"host": "localhost", **entry}]})
    (node,) = make_plan(hosts, LaunchOptions("train.py"), run_id="r1", master_addr="127.0.0.1", master_port=1,
                        controller_python=sys.executable, local_home=str(tmp_path / "crh")).nodes
    return node


def sync(node: NodePlan, root: Path) -> int:
    return sync_node(node, LocalTransport("localhost"), root, project_files(root))


@pytest.fixture()
def venv(tmp_path: Path) -> Path:
    """A virtualenv-like directory whose bin/activate puts a `cr-venv-python` on PATH:
    a python that only the hosts file's `setup:` makes reachable."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "cr-venv-python").symlink_to(sys.executable)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return tmp_path / "venv"


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "train.py").write_text("print('hi')\n")
    return root


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/dash"])      # a login shell of each kind
def test_sync_runs_setup_so_that_the_python_it_puts_on_path_is_found(tmp_path, venv, project, shell, monkeypatch):
    monkeypatch.setenv("SHELL", shell)
    wd = tmp_path / "remote" / "my project"            # not there yet: the sync makes it
    # `.`, not `source`: dash (Debian's sh) has only the POSIX name.
    node = local_node(tmp_path, python="cr-venv-python", setup=f". {venv}/bin/activate",
                      workdir=str(wd))
    assert sync(node, project) == 1
    assert (wd / "train.py").read_text() == "print('hi')\n"
    assert sync(node, project) == 0                    # nothing changed: nothing sent


def test_a_failing_setup_stops_the_sync_in_the_words_of_a_run(tmp_path, project):
    node = local_node(tmp_path, setup="echo preparing; false", workdir=str(tmp_path / "wd"))
    with pytest.raises(SyncError) as e:
        sync(node, project)
    assert str(e.value) == (f"localhost: cannot sync into {tmp_path / 'wd'}: "
                            "setup failed with exit code 1: preparing")
    assert not (tmp_path / "wd" / "train.py").exists()


def test_a_workdir_that_cannot_be_made_says_why(tmp_path, project):
    (tmp_path / "afile").write_text("")
    node = local_node(tmp_path, workdir=str(tmp_path / "afile" / "wd"))
    with pytest.raises(SyncError) as e:
        sync(node, project)
    assert str(e.value).startswith(f"localhost: cannot sync into {tmp_path / 'afile' / 'wd'}: mkdir: ")
    assert str(e.value).endswith("Not a directory")


def test_a_link_to_a_file_arrives_as_that_file_and_is_not_sent_again(tmp_path, project):
    (project / "configs").mkdir()
    (project / "configs" / "base.yaml").write_text("lr: 0.1\n")
    (project / "config.yaml").symlink_to("configs/base.yaml")          # inside the project
    (tmp_path / "shared.txt").write_text("from outside\n")
    (project / "shared.txt").symlink_to(tmp_path / "shared.txt")       # outside it
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "big.bin").write_bytes(b"x" * 100)
    (project / "data").symlink_to(tmp_path / "dataset")                # a directory: not followed
    (project / "gone.txt").symlink_to(tmp_path / "nowhere")            # dangling: skipped
    wd = tmp_path / "wd"
    node = local_node(tmp_path, workdir=str(wd))
    assert sync(node, project) == 4
    assert sorted(str(p.relative_to(wd)) for p in wd.rglob("*")) == [
        "config.yaml", "configs", "configs/base.yaml", "shared.txt", "train.py"]
    assert not (wd / "config.yaml").is_symlink() and (wd / "config.yaml").read_text() == "lr: 0.1\n"
    assert not (wd / "shared.txt").is_symlink() and (wd / "shared.txt").read_text() == "from outside\n"
    assert sync(node, project) == 0
    (project / "configs" / "base.yaml").write_text("lr: 0.2\n")
    os.utime(project / "configs" / "base.yaml", (1, 1))                # differs even within a second
    assert sync(node, project) == 2                                    # the file and the link to it
    assert (wd / "config.yaml").read_text() == "lr: 0.2\n"
