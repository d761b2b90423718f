"""Unit: `clusterrun up --dry-run` inside a Slurm allocation, with a fake `scontrol` on PATH.

Per node the dry run prints the srun line that runs its part by hand from a shell of the
allocation: the step `up` starts there (clusterrun.slurm.srun_argv) with `--pty`, running
the node's command of the SSH dry run (cd, setup, interface pick, env, torchrun). Here the
lines are parsed back word by word, and their node part runs under a real shell with an
argv recorder for python (tests/test_slurm_dryrun_e2e.py pastes them into a real allocation).
"""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterrun.cli import main
from clusterrun.dryrun import manual_argv, node_command, slurm_lines, slurm_node_line
from clusterrun.hostsfile import load_hosts
from clusterrun.options import LaunchOptions
from clusterrun.plan import Facts, IFNAME_VARS, build_plan
from clusterrun.slurm import srun_argv
from test_slurm_hosts_unit import FAKE_SCONTROL

NASTY_ARGS = ("--lr", "0.1", "two words", "it's", 'say "hi"', "$(touch x)", "`touch y`", "${HOME}", "a\nb",
              "日本語", "", "*", "~/x", ";", "&&", "|", "#c", "\\", "'", '"', "--log-dir=~/runs", "--no-python")


@pytest.fixture
def allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Job 77 of nodes node-b, node-a, node-c (scontrol's order), started in a directory
    whose name needs quoting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "scontrol"
    tool.write_text(FAKE_SCONTROL)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node-[a-c]")
    monkeypatch.setenv("CLUSTERRUN_HOME", str(tmp_path / "crhome"))
    work = tmp_path / "it's my work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def dry_run(*args: str) -> str:
    r = CliRunner().invoke(main, ["up", "--dry-run", *args])
    assert r.exit_code == 0, r.output
    return r.output


def srun_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("srun ")]


def plan_of(hosts_path: str, opts: LaunchOptions):
    hosts = load_hosts(hosts_path)
    return hosts, build_plan(hosts, opts, Facts(), run_id="dry-run", local_home="/tmp/crh", provisional=True)


def test_each_node_gets_the_srun_line_of_its_step_with_a_terminal(allocation: Path) -> None:
    text = dry_run("--nproc-per-node=2", "slurm", "train.py", *NASTY_ARGS)
    assert text.splitlines()[0] == ("3 nodes of Slurm job 77, world size 6, MASTER_ADDR=10.9.0.2 "
                                    "MASTER_PORT=29500")
    hosts, plan = plan_of("slurm", LaunchOptions("train.py", NASTY_ARGS, nproc_per_node=2))
    lines = [slurm_node_line(plan, n) for n in plan.nodes]
    assert len(srun_lines(text)) == 3 and all(f"\n{line}\n" in text for line in lines)
    for node_rank, (line, name) in enumerate(zip(lines, ["node-b", "node-a", "node-c"])):
        words = shlex.split(line)
        # every word quoted once: the line parses back to the step's argv, the node's
        # command one word of it
        assert words == srun_argv(name, "77", node_command(plan, plan.nodes[node_rank]), pty=True)
        assert words[:7] == ["srun", "--jobid=77", "-N1", "-n1", f"--nodelist={name}", "--overlap", "--pty"]
        assert "--input=all" not in words and "--export=NONE" in words
        assert not {"-l", "--label", "-u", "--unbuffered"} & set(words)
        cmd = shlex.split(words[-1])
        assert cmd[:2] == ["cd", str(allocation)]       # where `up` was started, as srun does
        torchrun = cmd[cmd.index("-m") - 1:]
        assert torchrun == list(manual_argv(plan.nodes[node_rank], "29500"))
        assert f"--node-rank={node_rank}" in torchrun and "--nnodes=3" in torchrun
        assert "--master-addr=10.9.0.2" in torchrun      # node 0's NodeAddr, not its name
        assert not any(w.startswith(("--rdzv-id", "--log-dir=/", "--redirects")) for w in torchrun)
        assert "CLUSTERRUN_JOB" not in line and ".clusterrun/jobs" not in line
    assert "# node 1 (node-a): global ranks 2-3" in text.splitlines()


def test_the_table_gives_each_nodes_nodeaddr_and_marks_the_spares(allocation: Path) -> None:
    (allocation / "h.yaml").write_text("slurm: {nodes: 2}\nnproc_per_node: 1\nmaster_port: 29611\n")
    text = dry_run("h.yaml", "train.py")
    lines = text.splitlines()
    assert lines[0] == ("2 nodes of Slurm job 77 (and 1 spare), world size 2, MASTER_ADDR=10.9.0.2 "
                        "MASTER_PORT=29611")
    assert lines[2:6] == [
        "node    node_rank  nproc  global ranks  NodeAddr",
        "node-b          0      1             0  10.9.0.2",
        "node-a          1      1             1  10.9.0.1",
        "node-c      spare                       10.9.0.3",
    ]
    assert [shlex.split(l)[4] for l in srun_lines(text)] == ["--nodelist=node-b", "--nodelist=node-a"]
    assert "# spare node-c: no line: it runs nothing until it takes a lost node's place" in text
    assert "node-c" not in "\n".join(srun_lines(text))
    assert "paste each line below into a shell of Slurm job 77" in text


def test_slurm_lines_compose_for_a_given_job(allocation: Path) -> None:
    """The per-node block alone, as a submission's dry run can print it after its script."""
    (allocation / "h.yaml").write_text("slurm: {nodes: 1}\n")
    hosts, plan = plan_of("h.yaml", LaunchOptions("train.py"))
    block = slurm_lines(plan, spares=hosts.spares, job="123")
    assert block[:2] == ["", "# node 0 (node-b): global rank 0"]
    assert shlex.split(block[2])[:2] == ["srun", "--jobid=123"]
    assert block[3:] == ["", "# spare node-a: no line: it runs nothing until it takes a lost node's place "
                         "(clusterrun up, at a restart)",
                         "# spare node-c: no line: it runs nothing until it takes a lost node's place "
                         "(clusterrun up, at a restart)"]


def test_secrets_are_masked_and_an_auto_port_is_a_placeholder(allocation: Path) -> None:
    (allocation / "h.yaml").write_text("slurm: {}\nmaster_port: auto\nenv: {HF_TOKEN: hf_secret, LR: '0.1'}\n")
    text = dry_run("h.yaml", "train.py")
    assert "hf_secret" not in text
    for line in srun_lines(text):
        cmd = shlex.split(shlex.split(line)[-1])
        assert {"HF_TOKEN=****", "LR=0.1", "--master-port=PORT"} <= set(cmd), cmd


def test_outside_an_allocation_the_dry_run_is_refused(allocation: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID")
    r = CliRunner().invoke(main, ["up", "--dry-run", "slurm", "train.py"])
    assert r.exit_code == 2 and "not inside a Slurm allocation" in r.output, r.output


@pytest.fixture()
def argv_recorder(tmp_path: Path) -> Path:
    exe = tmp_path / "bin" / "record-argv"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)},\n"
        "          open(os.environ['RECORD_TO'], 'w'))\n")
    exe.chmod(0o755)
    return exe


def test_the_node_part_of_a_line_runs_torchrun_with_exactly_the_planned_argv(allocation, argv_recorder,
                                                                              tmp_path) -> None:
    """What srun runs on the node (from /bin/sh on), run here under a real shell, as
    --export=NONE leaves it: SLURM_* only."""
    record = tmp_path / "record.json"
    (allocation / "h.yaml").write_text(json.dumps({
        "slurm": {"nodes": 2}, "python": str(argv_recorder), "nproc_per_node": 2,
        "setup": "FROM_SETUP='a b'; export FROM_SETUP",
        "env": {"RECORD_TO": str(record), "SPACES": "a  b", "QUOTE": "it's"}}))
    hosts, plan = plan_of("h.yaml", LaunchOptions("train.py", NASTY_ARGS))
    node = plan.nodes[1]
    words = shlex.split(slurm_node_line(plan, node, mask=False))
    r = subprocess.run(words[words.index("/bin/sh"):], env={"SLURM_JOB_ID": "77", "SLURM_CONF": "/x/slurm.conf"},
                       cwd="/", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == list(manual_argv(node, "29500")[1:])
    assert got["argv"][-len(NASTY_ARGS):] == list(NASTY_ARGS)
    assert got["cwd"] == str(allocation)
    env = got["env"]
    assert (env["SPACES"], env["QUOTE"], env["FROM_SETUP"], env["SLURM_CONF"]) == ("a  b", "it's", "a b",
                                                                                    "/x/slurm.conf")
    assert "CLUSTERRUN_JOB" not in env and "CLUSTERRUN_HOME" not in env
    assert all(v in env for v in IFNAME_VARS)        # picked on the node
    assert not (allocation / "x").exists() and not (allocation / "y").exists()
