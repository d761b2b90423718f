"""`clusterrun up` in-process with click's CliRunner: what the user types and reads.

Only --dry-run and argument errors are exercised: nothing here connects anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
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


def node_lines(out: str) -> list[str]:
    """The per-node lines of a dry run: `( CMD )` for localhost nodes, `ssh -t ...` for others."""
    return [line for line in out.splitlines() if line.startswith(("( ", "ssh "))]


def torchrun_words(line: str) -> list[str]:
    """The words of a localhost node's line from its `env` on."""
    assert line.startswith("( ") and line.endswith(" )"), line
    words = shlex.split(line[2:-2])
    return words[words.index("env"):]


def test_dry_run_prints_the_rank_table_and_every_command(hosts, home):
    r = up("--dry-run", str(hosts), "train.py")
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.startswith("2 nodes, world size 3, MASTER_ADDR=127.0.0.1 MASTER_PORT=29500\n")
    table = out.splitlines()[2:5]
    assert table[0].split() == ["node", "node_rank", "nproc", "global", "ranks", "ssh", "target"]
    assert table[1].split() == ["localhost", "0", "2", "0-1", "(local,", "no", "ssh)"]
    assert table[2].split() == ["second", "1", "1", "2", "(local,", "no", "ssh)"]
    assert "# node 0 (localhost): global ranks 0-1" in out and "# node 1 (second): global rank 2" in out
    commands = node_lines(out)
    assert len(commands) == 2
    for node_rank, line in enumerate(commands):
        words = torchrun_words(line)
        assert f"--node-rank={node_rank}" in words and "--nnodes=2" in words
        assert sys.executable in words, "default python is the controller's own interpreter"
        assert words[words.index(sys.executable):][1:3] == ["-m", "torch.distributed.run"]
        assert words[-1] == "train.py"
        assert not [w for w in words if w.startswith(("--log-dir", "--redirects", "--rdzv-id", "--no-python"))]


def test_dry_run_has_no_run_id_and_says_what_clusterrun_adds(hosts, home):
    out = up("--dry-run", str(hosts), "train.py").output
    assert not re.search(r"\d{8}-\d{6}-[0-9a-f]{6}", out) and "dry-run" not in out
    assert ".clusterrun/jobs" not in out and str(home) not in out and "CLUSTERRUN_JOB" not in out
    comments = " ".join(line[2:] for line in out.splitlines() if line.startswith("# "))
    for words in ("its own on", "same time", "`ip` (iproute2)", "tagged", "stopped when one fails",
                  "Ctrl-C or `clusterrun kill`", "~/.clusterrun/runs"):
        assert words in comments


def test_dry_run_connects_to_nothing_and_writes_no_run(hosts, home):
    assert up("--dry-run", str(hosts), "train.py").exit_code == 0
    assert not (home / "runs").exists() and not (home / "jobs").exists()


def test_everything_after_script_goes_to_the_script(hosts):
    r = up("--dry-run", "--nproc-per-node", "1", str(hosts), "train.py", "--lr", "0.1", "-m", "x",
           "--dry-run", "--env", "A=B", "--help")
    assert r.exit_code == 0, r.output
    words = torchrun_words(node_lines(r.output)[0])
    assert words[words.index("train.py") - 1] == "--max-restarts=0"
    assert words[words.index("train.py"):] == ["train.py", "--lr", "0.1", "-m", "x", "--dry-run", "--env",
                                               "A=B", "--help"]
    assert "--nproc-per-node=1" in words


@pytest.mark.parametrize("typed, fixed", [
    (["-m", "pkg.train", "--epochs", "3"], ["-m", "{hosts}", "pkg.train", "--epochs", "3"]),
    (["--nproc-per-node", "1", "--dry-run", "train.py", "-m", "x"],
     ["--nproc-per-node", "1", "--dry-run", "{hosts}", "train.py", "-m", "x"]),
    (["--env=A=b c", "--", "train.py"], ["--env=A=b c", "{hosts}", "train.py"]),
])
def test_options_typed_after_hosts_are_a_usage_error_with_the_command_as_it_should_be(hosts, typed, fixed):
    """torchrun takes its options anywhere before the script; up takes them before HOSTS."""
    r = up("--sync", str(hosts), *typed)
    assert r.exit_code == 2, r.output
    assert f"SCRIPT {typed[0]!r} starts with '-': options of `up` go before HOSTS" in r.output
    assert "not found" not in r.output
    suggested = r.output.splitlines()[-1].strip()
    words = [w.replace("{hosts}", str(hosts)) for w in ["clusterrun", "up", "--sync", *fixed]]
    assert shlex.split(suggested) == words
    again = up("--dry-run", *words[3:]) if "--dry-run" not in words else up(*words[2:])
    assert again.exit_code == 0, again.output


def test_an_unknown_option_after_hosts_is_a_usage_error_without_a_guess(hosts):
    r = up(str(hosts), "--nproc", "2", "train.py")
    assert r.exit_code == 2, r.output
    assert "SCRIPT '--nproc' starts with '-': options of `up` go before HOSTS" in r.output
    assert "clusterrun up " not in r.output


def test_module_mode(hosts):
    r = up("--dry-run", "-m", str(hosts), "pkg.train", "--epochs", "3")
    assert r.exit_code == 0, r.output
    words = torchrun_words(node_lines(r.output)[0])
    assert words[-5:] == ["--max-restarts=0", "-m", "pkg.train", "--epochs", "3"]


def test_env_option_overrides_and_master_port_is_used(hosts):
    r = up("--dry-run", "--env", "NCCL_DEBUG=INFO", "--env", "X=a b", "--master-port", "29612",
           str(hosts), "train.py")
    assert r.exit_code == 0, r.output
    words = torchrun_words(node_lines(r.output)[0])
    assert "NCCL_DEBUG=INFO" in words and "X=a b" in words and "--master-port=29612" in words


def test_an_auto_master_port_is_a_placeholder_the_user_replaces(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("master_port: auto\nhosts: [localhost, localhost]\n")
    out = up("--dry-run", str(p), "train.py").output
    assert "MASTER_PORT=auto (a free port on node 0, picked at start)" in out
    assert "replace PORT in every line" in out
    assert all("--master-port=PORT" in torchrun_words(line) for line in node_lines(out))


@pytest.mark.e2e       # real torchrun and torch, for tens of seconds: not the fast tier
def test_the_demos_lines_pasted_into_two_shells_run_it_by_hand(tmp_path, home):
    """hosts.example.yaml's dry run, pasted: every rank's output on its node's shell, no trace left."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    r = up("--dry-run", "--master-port", str(port), str(repo / "hosts.example.yaml"),
           "scripts/ddp_example.py", "--epochs", "1")
    assert r.exit_code == 0, r.output
    lines = node_lines(r.output)
    assert len(lines) == 2
    # torchrun's own (empty) log directory goes to TMPDIR: here, not the machine's /tmp.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    shells = [subprocess.Popen(["bash", "-c", line], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True) for line in lines]
    try:
        outputs = [sh.communicate(timeout=300)[0] for sh in shells]
    finally:
        for sh in shells:
            if sh.poll() is None:
                os.killpg(sh.pid, 9)
    assert [sh.returncode for sh in shells] == [0, 0], outputs
    for node_rank, out in enumerate(outputs):
        # Unanchored: two ranks share this shell's output, and print() writes a line's
        # newline apart from its text, so lines can splice (what clusterrun's tags prevent).
        hello = sorted(re.findall(r"hello from rank (\d)/4 \(local rank (\d)\)", out))
        assert hello == [(str(2 * node_rank), "0"), (str(2 * node_rank + 1), "1")], out
    assert re.search(r"epoch 0 mean loss \d+\.\d+", outputs[0]), outputs[0]
    assert not home.exists(), "neither the dry run nor the pasted lines write clusterrun state"


@pytest.mark.parametrize("workdir, ran_in", [(None, "."), ("sub dir", "sub dir")])
def test_a_localhost_line_pasted_into_a_new_terminal_runs_where_up_would(tmp_path, monkeypatch, workdir, ran_in):
    """A localhost node runs in the directory `up` starts in (or its relative workdir
    there); a new terminal starts elsewhere, so the pasted line goes there first."""
    start = tmp_path / "my project"
    (start / "sub dir").mkdir(parents=True)
    recorder = tmp_path / "record-cwd"
    recorder.write_text(f"#!{sys.executable}\nimport os, sys\nopen(sys.argv[0] + '.out', 'w').write(os.getcwd())\n")
    recorder.chmod(0o755)
    hosts = tmp_path / "hosts.yaml"
    entry = {"host": "localhost", "python": str(recorder), **({"workdir": workdir} if workdir else {})}
    hosts.write_text(json.dumps({"hosts": [entry]}))
    monkeypatch.chdir(start)
    r = up("--dry-run", str(hosts), "train.py")
    assert r.exit_code == 0, r.output
    (line,) = node_lines(r.output)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sh = subprocess.run(["sh", "-c", line], cwd=elsewhere, capture_output=True, text=True, timeout=30)
    assert sh.returncode == 0, sh.stderr
    assert Path(str(recorder) + ".out").read_text() == str((start / ran_in).resolve())


def test_a_localhost_line_with_an_absolute_workdir_needs_no_start_directory(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(json.dumps({"hosts": [{"host": "localhost", "workdir": str(tmp_path)}]}))
    monkeypatch.chdir(tmp_path)
    (line,) = node_lines(up("--dry-run", str(hosts), "train.py").output)
    assert line.startswith(f"( cd {tmp_path} && ") and line.count("cd ") == 1


def test_bad_hosts_file_exits_2_naming_file_and_field(tmp_path):
    bad = tmp_path / "bad hosts.yaml"
    bad.write_text("hosts:\n  - localhost\n  - host: localhost\n    nproc_per_node: four\n")
    r = up("--dry-run", str(bad), "train.py")
    assert r.exit_code == 2
    assert r.output.startswith("clusterrun: ")
    assert r.output == f"clusterrun: {bad}: hosts[1].nproc_per_node: must be a positive integer or `gpu`, got 'four'\n"


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


@pytest.mark.parametrize("value, window", [(None, 60.0), ("5", 5.0), ("2m", 120.0)])
def test_up_reads_the_hidden_reconnect_window_setting_once_and_defaults_to_60s(hosts, monkeypatch, value,
                                                                              window):
    """CLUSTERRUN_RECONNECT_WINDOW (the test suite's, not the user's) reaches `up`'s options."""
    from clusterrun.commands import up as up_command

    asked = []
    monkeypatch.setattr(up_command, "up", lambda path, opts, up_opts: asked.append(up_opts.reconnect_window))
    if value is None:
        monkeypatch.delenv("CLUSTERRUN_RECONNECT_WINDOW", raising=False)
    else:
        monkeypatch.setenv("CLUSTERRUN_RECONNECT_WINDOW", value)
    r = up(str(hosts), "train.py")
    assert r.exit_code == 0, r.output
    assert asked == [window]


def test_a_bad_reconnect_window_setting_is_a_usage_error_naming_it(hosts, monkeypatch):
    monkeypatch.setenv("CLUSTERRUN_RECONNECT_WINDOW", "soon")
    r = up(str(hosts), "train.py")
    assert r.exit_code == 2
    assert "CLUSTERRUN_RECONNECT_WINDOW: must be a duration" in r.output


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
    assert commands == ["_collect", "check", "exec", "kill", "lint", "logs", "ps", "stacks", "status", "up"]

