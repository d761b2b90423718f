"""Unit: `clusterrun exec` in-process (CliRunner) on localhost nodes, through a real shell.

A node whose `workdir` or `setup:` fails is told in words, as `up` tells it, and the
command counts as failed there (exit 1); the other nodes still run it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterrun.cli import main
from clusterrun.commands.exec import exec_command, exec_program, login_of
from clusterrun.login import for_any_shell
from clusterrun.hostsfile import parse_hosts
from clusterrun.nodeagent import FAILED_MARK

# A login shell of each kind (scripts/setup --test installs zsh, tcsh and fish)
SHELLS = ["/bin/bash", "/bin/dash", "/usr/bin/zsh", "/usr/bin/tcsh", "/usr/bin/fish"]


def run_exec(hosts: Path, *argv: str):
    r = CliRunner().invoke(main, ["exec", "--no-color", str(hosts), "--", *argv])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r


def hosts_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hosts.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("shell", SHELLS)
def test_a_failing_setup_is_told_in_words_and_the_command_does_not_run(shell, tmp_path, monkeypatch):
    monkeypatch.setenv("SHELL", shell)
    ran = tmp_path / "ran"
    hosts = hosts_file(tmp_path, f"""\
hosts:
  - host: localhost
    name: good
  - host: localhost
    name: bad
    setup: ["echo getting ready", "printf 'half a line'; sh -c 'exit 3'"]
""")
    script = f'echo ran >> {shlex.quote(str(ran))}; echo "ran on $0"'
    r = run_exec(hosts, "sh", "-c", script)
    assert r.exit_code == 1, r.output
    assert set(r.stdout.splitlines()) == {"[good] ran on sh", "[bad] getting ready", "[bad] half a line"}
    assert FAILED_MARK not in r.output
    assert r.stderr.splitlines() == [
        f"clusterrun: sh -c {shlex.quote(script)} did not start on 1 of 2 nodes:",
        "  bad: setup failed with exit code 3: getting ready | half a line",
    ]
    assert ran.read_text() == "ran\n", "only the good node ran the command"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_missing_workdir_is_told_in_words(shell, tmp_path, monkeypatch):
    monkeypatch.setenv("SHELL", shell)
    hosts = hosts_file(tmp_path, "hosts:\n  - host: localhost\n    workdir: /nonexistent/clusterrun-wd\n")
    r = run_exec(hosts, "true")
    assert r.exit_code == 1, r.output
    # The shell's own words (bash and dash each have theirs) stay the node's output.
    assert len(r.stdout.splitlines()) == 1 and "/nonexistent/clusterrun-wd" in r.stdout
    assert r.stderr == ("clusterrun: true did not start on 1 of 1 nodes:\n"
                        "  localhost: workdir /nonexistent/clusterrun-wd: No such file or directory\n")


def test_a_command_that_fails_after_a_good_setup_is_its_own_failure(tmp_path):
    hosts = hosts_file(tmp_path, "hosts:\n  - host: localhost\n    setup: [\"echo set\"]\n")
    r = run_exec(hosts, "sh", "-c", "echo out; exit 1")
    assert r.exit_code == 1
    assert r.stdout == "[localhost] set\n[localhost] out\n"
    assert r.stderr == "clusterrun: sh -c 'echo out; exit 1' failed on 1 of 1 nodes: localhost (exit 1)\n"


def test_the_exec_line_is_the_login_line_of_up_then_env_and_argv():
    (host,) = parse_hosts({"hosts": [{"host": "gpu-a", "workdir": "~/my proj", "setup": ["source v/bin/activate"],
                                      "env": {"A": "x y"}}]}).hosts
    assert exec_command(host, ["echo", "$HOME", "it's"]) == for_any_shell(login_of(host).script(
        exec_program(host, ["echo", "$HOME", "it's"])))
    rest = (f"{{ source v/bin/activate; }} </dev/null || {{ echo \"{FAILED_MARK}setup $?\" >&2; exit 1; }}; "
            "exec env A='x y' echo '$HOME' 'it'\"'\"'s'")
    assert login_of(host).script(exec_program(host, ["echo", "$HOME", "it's"])) == (
        f"cd ~/'my proj' || {{ echo \"{FAILED_MARK}workdir $([ -d ~/'my proj' ] && echo denied || "
        "{ [ -e ~/'my proj' ] && echo notdir || echo missing; })\" >&2; exit 1; }; "
        # the setup and the command in the login shell if it is of the Bourne family, else here
        "case ${SHELL##*/} in bash|zsh|ksh|ksh93|mksh) unset SHLVL; exec \"$SHELL\" -c "
        + shlex.quote(rest) + ";; esac; " + rest)
