"""Unit: the login line tags its `setup:` (and only it) so that a hung setup can be found."""

from __future__ import annotations

import subprocess

from clusterrun.login import Login
from clusterrun.nodeagent import SETUP_VAR


def test_the_setups_processes_carry_the_tag_and_the_program_does_not(tmp_path):
    seen = tmp_path / "in-setup"
    line = Login(None, (f"echo ${SETUP_VAR} > {seen}",)).line(f'sh -c "echo program:${{{SETUP_VAR}:-none}}"',
                                                            tag="abc123")
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    assert seen.read_text() == "abc123\n"
    assert out == "program:none\n"


def test_no_setup_no_tag():
    assert SETUP_VAR not in Login("/w", ()).line("prog", tag="abc123")
    assert SETUP_VAR not in Login(None, ("x",)).line("prog")
