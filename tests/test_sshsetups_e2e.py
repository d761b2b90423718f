"""End-to-end: SSH setups of real sites (issue 23), on both transports.

Users with each login shell (bash, dash, zsh, tcsh, fish), made for the test and
removed after it; sshd settings changed on one node (`sshd_settings`: lines added to
its sshd_config, sshd re-reads it on SIGHUP) and restored after the test.
"""

from __future__ import annotations

import time

import pytest

from kit import hosts_file

pytestmark = pytest.mark.e2e


def exec_on(ctl, tmp_path, entries: list, *argv: str, **top):
    hosts = hosts_file(tmp_path, entries, filename=f"hosts-{time.monotonic_ns()}.yaml", **top)
    return ctl.run("exec", str(hosts), "--", *argv, timeout=120)


# --- item 8: the count of unreachable nodes, in words that fit it -------------------------

def test_exec_on_one_node_that_cannot_be_reached_says_it_ran_nowhere(cluster, ctl, tmp_path):
    dead = {"host": cluster.names[0], "name": "dead", "port": 2223}     # nothing listens there
    r = exec_on(ctl, tmp_path, [dead], "hostname", connect_timeout=3)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.splitlines()[0] == "clusterrun: cannot reach the node (the command ran nowhere):"
    assert r.stderr.splitlines()[1].startswith("  dead: ") and r.stdout == ""
    both = [dead, {**dead, "name": "dead2"}]
    r = exec_on(ctl, tmp_path, both, "hostname", connect_timeout=3)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.splitlines()[0] == "clusterrun: cannot reach any of the 2 nodes (the command ran nowhere):"
