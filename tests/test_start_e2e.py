"""End-to-end: a node that never finishes starting (a hung `setup:`), on the sshd test cluster.

`up` ends the wait at its start limit (--start-timeout, `start_timeout:`) naming the node
and what it was doing, exit 3, nothing left on the nodes; `check` has its own limit.
"""

from __future__ import annotations

import pytest

from kit import assert_nothing_left, hosts_file, write

pytestmark = pytest.mark.e2e

HUNG_SETUP = "sleep 1000"


@pytest.mark.parametrize("port", ["fixed", "auto"])
def test_up_ends_a_hung_setup_at_the_start_limit_naming_the_node(cluster, ctl, tmp_path, port):
    """fixed: the preflight runs inside the start (each node probes, then waits for "go");
    auto: a probe of its own first picks node 0's port. Both end at the limit."""
    n0, n1 = cluster.names[:2]
    script = write(tmp_path / "never.py", "print('NEVER RUNS')\n")
    top = {"master_port": "auto"} if port == "auto" else {}
    hosts = hosts_file(tmp_path, [n0, {"host": n1, "setup": HUNG_SETUP}], **top)
    r = ctl.run("up", "--start-timeout", "5s", str(hosts), str(script), timeout=90)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "NEVER RUNS" not in r.stdout
    assert "had not started within the start limit (5s); nothing was started" in r.stderr, r.stderr
    assert f"  {n1}: in setup for 5s (its setup was ended)" in r.stderr.splitlines(), r.stderr
    assert f"  {n0}:" not in r.stderr          # node 0 had answered: it is not named
    assert "--start-timeout" in r.stderr and "Traceback" not in r.stderr
    # Nothing is left: no setup process on the nodes, no run kept here.
    assert_nothing_left(cluster)
    runs = tmp_path / "crhome" / "runs"
    assert not runs.exists() or not list(runs.iterdir())


def test_up_start_timeout_from_the_hosts_file(cluster, ctl, tmp_path):
    n0 = cluster.names[0]
    script = write(tmp_path / "never.py", "print('NEVER RUNS')\n")
    hosts = hosts_file(tmp_path, [{"host": n0, "setup": ["echo preparing", HUNG_SETUP]}], start_timeout="4s")
    r = ctl.run("up", str(hosts), str(script), timeout=90)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"  {n0}: in setup for 4s (its setup was ended)" in r.stderr.splitlines(), r.stderr
    assert_nothing_left(cluster)


def test_check_reports_a_hung_setup_at_its_limit_and_shows_the_other_nodes(cluster, ctl, tmp_path):
    n0, n1 = cluster.names[:2]
    hosts = hosts_file(tmp_path, [n0, {"host": n1, "setup": HUNG_SETUP}])
    r = ctl.run("check", "--timeout", "30s", str(hosts), timeout=120)   # torch imports within it
    assert r.returncode == 3, r.stdout + r.stderr
    rows = {l.split()[0]: l for l in r.stdout.splitlines() if l.startswith(f"{cluster.prefix}-n")}
    assert rows[n0].endswith("ok") and rows[n1].endswith("FAIL"), r.stdout
    assert f"clusterrun: {n1}: in setup for 30s (its setup was ended)" in r.stdout.splitlines(), r.stdout
    assert_nothing_left(cluster)
