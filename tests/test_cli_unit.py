"""`clusterrun up` in-process with click's CliRunner: what the user types and reads.

Only --dry-run and argument errors are exercised: nothing here connects anywhere.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterrun.cli import main


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "crh"
    monkeypatch.setenv("CLUSTERRUN_HOME", str(h))
    monkeypatch.delenv("NO_COLOR", raising=False)
    return h


@pytest.fixture()
def hosts(tmp_path) -> Path:
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  - localhost:2\n  - host: localhost\n    name: second\n    nproc_per_node: 1\n")
    return p


def up(*args: str):
    result = CliRunner().invoke(main, ["up", *args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        f"unexpected exception: {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output
    return result


def test_dry_run_prints_the_rank_table_and_every_command(hosts, home):
    r = up("--dry-run", str(hosts), "train.py")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "2 nodes, world size 3, MASTER_ADDR=127.0.0.1 MASTER_PORT=29500" in out
    table = out.splitlines()[2:5]
    assert table[0].split() == ["node", "node_rank", "nproc", "global", "ranks", "ssh", "target"]
    assert table[1].split() == ["localhost", "0", "2", "0-1", "(local,", "no", "ssh)"]
    assert table[2].split() == ["second", "1", "1", "2", "(local,", "no", "ssh)"]
    assert "# node 0 (localhost)" in out and "# node 1 (second)" in out
    commands = [line for line in out.splitlines() if line.startswith("env ")]
    assert len(commands) == 2
    for node_rank, line in enumerate(commands):
        words = shlex.split(line)
        assert f"--node-rank={node_rank}" in words and "--nnodes=2" in words
        assert sys.executable in words, "default python is the controller's own interpreter"
        assert any(w.startswith(f"--log-dir={home}/jobs/") for w in words)
        assert words[-3:] == [sys.executable, "-u", "train.py"]


def test_dry_run_connects_to_nothing_and_writes_no_run(hosts, home):
    assert up("--dry-run", str(hosts), "train.py").exit_code == 0
    assert not (home / "runs").exists()


def test_everything_after_script_goes_to_the_script(hosts):
    r = up("--dry-run", "--nproc-per-node", "1", str(hosts), "train.py", "--lr", "0.1", "-m", "x",
           "--dry-run", "--env", "A=B", "--help")
    assert r.exit_code == 0, r.output
    line = next(line for line in r.output.splitlines() if line.startswith("env "))
    words = shlex.split(line)
    assert words[words.index("train.py") - 2:words.index("train.py")] == [sys.executable, "-u"]
    assert words[words.index("train.py"):] == ["train.py", "--lr", "0.1", "-m", "x", "--dry-run", "--env",
                                               "A=B", "--help"]
    assert "--nproc-per-node=1" in words


def test_module_mode(hosts):
    r = up("--dry-run", "-m", str(hosts), "pkg.train", "--epochs", "3")
    assert r.exit_code == 0, r.output
    line = next(line for line in r.output.splitlines() if line.startswith("env "))
    assert shlex.split(line)[-6:] == [sys.executable, "-u", "-m", "pkg.train", "--epochs", "3"]


def test_env_option_overrides_and_master_port_is_used(hosts):
    r = up("--dry-run", "--env", "NCCL_DEBUG=INFO", "--env", "X=a b", "--master-port", "29612",
           str(hosts), "train.py")
    assert r.exit_code == 0, r.output
    line = next(line for line in r.output.splitlines() if line.startswith("env "))
    words = shlex.split(line)
    assert "NCCL_DEBUG=INFO" in words and "X=a b" in words and "--master-port=29612" in words


def test_bad_hosts_file_exits_2_naming_file_and_field(tmp_path):
    bad = tmp_path / "bad hosts.yaml"
    bad.write_text("hosts:\n  - localhost\n  - host: localhost\n    nproc_per_node: four\n")
    r = up("--dry-run", str(bad), "train.py")
    assert r.exit_code == 2
    assert r.output.startswith("clusterrun: ")
    assert r.output == f"clusterrun: {bad}: hosts[1].nproc_per_node: must be a positive integer, got 'four'\n"


def test_unknown_key_in_hosts_file(tmp_path):
    bad = tmp_path / "hosts.yaml"
    bad.write_text("hosts:\n  - host: localhost\n    nproc_per_nod: 2\n")
    r = up("--dry-run", str(bad), "train.py")
    assert r.exit_code == 2
    assert r.output.startswith(f"clusterrun: {bad}: hosts[0].nproc_per_nod: unknown key")
    assert "did you mean `nproc_per_node`" in r.output


def test_missing_hosts_file(tmp_path):
    r = up("--dry-run", str(tmp_path / "nope.yaml"), "train.py")
    assert r.exit_code == 2
    assert r.output == f"clusterrun: {tmp_path / 'nope.yaml'}: no such file\n"


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "hosts.yaml"
    bad.write_text("hosts:\n  - a\n - b\n")
    r = up("--dry-run", str(bad), "train.py")
    assert r.exit_code == 2
    assert r.output.startswith(f"clusterrun: {bad}: line ")


def test_localhost_master_with_remote_nodes_is_a_usage_error(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts: [localhost, gpu-b]\n")
    r = up("--dry-run", str(p), "train.py")
    assert r.exit_code == 2
    assert r.output.startswith("clusterrun: ") and "master_addr" in r.output


@pytest.mark.parametrize("args, mentions", [
    (["--env", "NOEQUALS"], "--env"),
    (["--env", "BAD-KEY=1"], "--env"),
    (["--env", "1X=1"], "--env"),
    (["--master-port", "99999"], "--master-port"),
    (["--master-port", "0"], "--master-port"),
    (["--master-port", "http"], "--master-port"),
    (["--master-port", "-1"], "--master-port"),
    (["--nproc-per-node", "0"], "--nproc-per-node"),
    (["--nproc-per-node", "four"], "--nproc-per-node"),
])
def test_bad_options_exit_2_and_name_the_option(hosts, args, mentions):
    r = up("--dry-run", *args, str(hosts), "train.py")
    assert r.exit_code == 2, r.output
    assert mentions in r.output


def test_missing_script_is_a_usage_error(hosts):
    r = up("--dry-run", str(hosts))
    assert r.exit_code == 2
    assert "SCRIPT" in r.output


def test_regression_master_port_superscript_digit_is_a_usage_error(hosts):
    r = CliRunner().invoke(main, ["up", "--dry-run", "--master-port", "²", str(hosts), "train.py"])
    assert r.exit_code == 2


def test_regression_env_key_with_newline_is_rejected(hosts):
    r = CliRunner().invoke(main, ["up", "--dry-run", "--env", "A\n=1", str(hosts), "train.py"])
    assert r.exit_code == 2


def test_a_directory_as_hosts_file_exits_2_naming_it(tmp_path):
    r = up("--dry-run", str(tmp_path), "train.py")
    assert r.exit_code == 2
    assert str(tmp_path) in r.output and "directory" in r.output


OLDEST_CLICK = "8.0.0"      # setup.cfg: click>=8.0


def test_every_command_has_its_name_on_the_oldest_click_allowed(tmp_path):
    """click 8.0/8.1 name a command after its function unless given a name."""
    target = tmp_path / "click"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "--target", str(target), f"click=={OLDEST_CLICK}"],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot install click {OLDEST_CLICK}: {pip.stderr[-500:]}")
        pytest.skip(f"cannot install click {OLDEST_CLICK} (offline?)")
    code = ("import click, json; from clusterrun.cli import main\n"
            "print(json.dumps([click.__version__, sorted(main.commands)]))")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(target)})
    version, commands = json.loads(r.stdout)
    assert version == OLDEST_CLICK
    assert commands == ["_collect", "check", "exec", "kill", "lint", "logs", "ps", "status", "up"]

