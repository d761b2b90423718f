"""Unit: the srun transport's command line, without Slurm.

The srun line is an argv list (no local shell); the node runs `/bin/sh -c LOGIN sh
COMMAND`, so COMMAND reaches the user's shell as one word, exactly as written. Here
that node part runs on this machine, under sh, with odd commands.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from clusterrun.slurm import srun_argv
from clusterrun.transports.srun import SrunProcess, SrunTransport, render

ODD = """printf '[%s]\\n' "a b" 'it'"'"'s' '$HOME' "\\`x\\`" '*' "$(printf 'tab\\there')" 'ü'"""


def node_part(argv: list[str]) -> list[str]:
    return argv[argv.index("/bin/sh"):]


def test_the_srun_line():
    argv = srun_argv("gpu-a01", "1234", "echo hi")
    assert argv[:argv.index("/bin/sh")] == [
        "srun", "--jobid=1234", "-N1", "-n1", "--nodelist=gpu-a01", "--overlap", "--input=all",
        "--export=NONE", "--chdir=/", "--mpi=none", "--quiet", "--job-name=clusterrun"]
    # never a label (-l cuts long lines), never a pty (-u)
    assert not {"-l", "--label", "-u", "--unbuffered"} & set(argv)
    assert argv[-2:] == ["sh", "echo hi"]


def test_the_command_is_one_word_and_renders_back():
    argv = srun_argv("n1", "7", ODD)
    assert argv[-1] == ODD
    assert shlex.split(render(argv)) == argv


def test_the_node_part_runs_the_command_as_written():
    argv = srun_argv("n1", "7", ODD)
    out = subprocess.run(node_part(argv), capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"}, check=True).stdout
    assert out.splitlines()[-7:] == ["[a b]", "[it's]", "[$HOME]", "[`x`]", "[*]", "[tab\there]", "[ü]"]


def test_the_node_part_makes_a_login_environment_from_the_passwd_entry():
    import pwd
    me = pwd.getpwuid(os.getuid())
    argv = srun_argv("n1", "7", 'echo "$USER|$LOGNAME|$HOME|$SHELL|$PWD"')
    # as under --export=NONE: nothing but what Slurm sets
    out = subprocess.run(node_part(argv), capture_output=True, text=True, timeout=60,
                         env={"SLURM_JOB_ID": "7"}, cwd="/", check=True).stdout
    home = os.path.realpath(me.pw_dir) if os.path.isdir(me.pw_dir) else "/"
    assert out.splitlines()[-1] == f"{me.pw_name}|{me.pw_name}|{me.pw_dir}|{me.pw_shell}|{home}"


def test_merged_stderr_is_joined_on_the_node():
    argv = srun_argv("n1", "7", "echo out; echo err >&2", merge_stderr=True)
    p = subprocess.run(node_part(argv), capture_output=True, text=True, timeout=60)
    assert p.stdout.splitlines()[-2:] == ["out", "err"]
    assert p.stderr == ""


def test_srun_s_own_words_on_a_failed_task_are_left_out_of_stderr():
    proc = SrunProcess(["sh", "-c", 'echo "srun: error: n1: task 0: Exited with exit code 3" >&2; '
                                    'echo "srun: error: n1: task 0: Killed" >&2; echo real >&2; '
                                    'echo "srun: error: Unable to create step for job 7" >&2; exit 3'])
    try:
        assert proc.wait(30) == 3
        assert proc.stderr_text() == "real\nsrun: error: Unable to create step for job 7\n"
    finally:
        proc.close()


def test_a_transport_without_srun_on_path_says_so(monkeypatch):
    import pytest

    from clusterrun.errors import UnreachableError
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UnreachableError, match="n1: transport srun needs the Slurm client `srun`"):
        SrunTransport("n1", "7").exec("true")
