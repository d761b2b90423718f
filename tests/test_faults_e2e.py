"""End-to-end: the promises of docs/guarantees.md, on the sshd test cluster.

Host keys (unknown refused, accept-new, changed always refused, nothing started
anywhere), faults (a silent node at start, a node whose processes all die, a
network link cut for seconds), injection and secrets.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit import REPORT, TICKER, assert_nothing_left, hosts_file, reports, tagged_ticks, write

pytestmark = pytest.mark.e2e



def alias(name: str, addr: str, cluster, known_hosts: Path, extra: str = "") -> str:
    return (f"Host {name}\n    HostName {addr}\n    User root\n"
            f"    IdentityFile {cluster.home / '.ssh' / 'id_ed25519'}\n"
            f"    UserKnownHostsFile {known_hosts}\n{extra}")


# --- host keys ---------------------------------------------------------------------

def test_unknown_host_key_refused_then_trusted_with_accept_new(cluster, ctl, tmp_path, ssh_config):
    known = tmp_path / "known_hosts"
    known.write_text("")
    ssh_config(alias("fresh", cluster.addrs[0], cluster, known))
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, ["fresh"])
    r = ctl.run("up", str(hosts), str(script))
    assert r.returncode == 3 and "unknown host key" in r.stderr and "--accept-new-host-keys" in r.stderr
    assert known.read_text() == ""
    r = ctl.run("up", "--accept-new-host-keys", str(hosts), str(script))
    assert r.returncode == 0, r.stderr
    assert known.read_text().startswith(f"{cluster.addrs[0]} ssh-ed25519 ")
    r = ctl.run("up", str(hosts), str(script))         # now known: no flag needed
    assert r.returncode == 0, r.stderr


def test_strict_host_key_checking_accept_new_in_ssh_config_is_honoured(cluster, ctl, tmp_path, ssh_config):
    known = tmp_path / "known_hosts"
    known.write_text("")
    ssh_config(alias("fresh", cluster.addrs[1], cluster, known, "    StrictHostKeyChecking accept-new\n"))
    r = ctl.run("exec", str(hosts_file(tmp_path, ["fresh"])), "--", "hostname")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"[fresh] {cluster.names[1]}\n"
    assert cluster.addrs[1] in known.read_text()


def test_a_changed_host_key_is_always_refused_and_nothing_starts(cluster, ctl, tmp_path, ssh_config):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"{cluster.addrs[1]} {(other.with_suffix('.pub')).read_text().split(' ')[0]} "
                     f"{(other.with_suffix('.pub')).read_text().split(' ')[1]}\n")
    ssh_config(alias("impostor", cluster.addrs[1], cluster, known))
    script = write(tmp_path / "ticker.py", TICKER)
    hosts = hosts_file(tmp_path, [cluster.names[0], "impostor"])
    for flags in ([], ["--accept-new-host-keys"]):
        r = ctl.run("up", *flags, str(hosts), str(script), "5", "0.1")
        assert r.returncode == 3, r.stdout + r.stderr
        assert "impostor" in r.stderr and "CHANGED" in r.stderr and "nothing was started" in r.stderr
        assert "tick" not in r.stdout
    assert_nothing_left(cluster)


# --- faults --------------------------------------------------------------------------

def test_a_silent_node_at_start_is_named_within_the_connect_timeout(cluster, ctl, tmp_path, ssh_config):
    # An address on our own test bridge (whatever its subnet) where no node answers: packets go nowhere.
    ghost = cluster.addrs[0].rsplit(".", 1)[0] + ".250"
    known = cluster.home / ".ssh" / "known_hosts"
    ssh_config(alias("ghost", ghost, cluster, known))
    script = write(tmp_path / "ticker.py", TICKER)
    hosts = hosts_file(tmp_path, [cluster.names[0], "ghost"], connect_timeout=2)
    r = ctl.run("up", str(hosts), str(script), "5", "0.1", timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    if os.environ.get("CLUSTERRUN_TRANSPORT") == "openssh":    # ssh's own words
        assert re.search(rf"ghost: ssh: connect to host {re.escape(ghost)} port 22: "
                         r"(Connection timed out|No route to host)", r.stderr), r.stderr
    else:
        assert f"ghost: root@{ghost}:22: timed out after 2s" in r.stderr
    assert "nothing was started" in r.stderr and "tick" not in r.stdout
    assert_nothing_left(cluster)


def test_a_node_whose_processes_are_all_killed_ends_the_run(cluster, ctl, tmp_path):
    victim = cluster.names[1]
    p = ctl.ticker(cluster, 2, 100000, 0.05)
    p.wait_for(" tick 1 5")
    # Everything on that node but its sshd listener: job, workers, agent, ssh session.
    for pid in cluster.leftover_pids(victim):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, err = p.finish(120)
    assert p.returncode == 1, err
    assert f"clusterrun: node {victim} (node_rank 1) was lost" in err, err
    assert f"clusterrun: node {cluster.names[0]} (rank 0) was stopped after node {victim} failed" in err
    # `status` says the same of it as the summary (not torchrun's own code, a SIGKILL or SIGTERM).
    row = next(l for l in ctl.run("status").stdout.splitlines() if l.startswith(cluster.names[0] + " "))
    assert row.endswith(" stopped"), row
    assert_nothing_left(cluster)


@pytest.mark.transports("paramiko")
def test_kill_ends_what_a_lost_node_left_running_once_it_answers_again(cluster, ctl, tmp_path):
    """A node whose sshd dies mid-run is lost after the reconnect window, but its job goes on
    there (holding GPUs, on a real cluster). Once the node answers again, `kill` ends it."""
    victim = cluster.names[1]
    window = ctl.short_reconnect_window()
    p = ctl.ticker(cluster, 2, 100000, 0.05)
    p.wait_for(" tick 1 5")
    sshd = cluster.sshd_pid(victim)
    sessions = [int(x) for x in subprocess.run(["ps", "-o", "pid=", "--ppid", str(sshd)], capture_output=True,
                                               text=True).stdout.split()]
    try:
        for pid in [sshd, *sessions]:           # the node's sshd and its sessions, not the job
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = p.finish(180)
    finally:
        subprocess.run([str(Path(__file__).parent.parent / "scripts" / "testcluster"), "start-sshd", victim,
                        "--state", str(cluster.state)], capture_output=True, timeout=60, check=True)
    assert p.returncode == 1, err
    run_id = ctl.status()["run"]
    assert (f"clusterrun: node {victim} (node_rank 1) was lost: unreachable for {window}s (its job may still run "
            f"there: `clusterrun kill {run_id}` ends it once the node answers)") in err.splitlines(), err
    assert any("ticker.py" in d for d in cluster.describe_pids(cluster.leftover_pids(victim))), "the job went on"
    k = ctl.run("kill", run_id)
    assert k.returncode == 0, k.stdout + k.stderr
    assert (f"clusterrun: run {run_id} had ended, but {victim} had been lost: what was left of its job there "
            "is killed") in k.stderr.splitlines(), k.stderr
    assert_nothing_left(cluster)
    (node,) = [n for n in ctl.status(run_id)["nodes"] if n["node"] == victim]
    assert node["state"] == "killed"
    assert "has already ended" in ctl.run("kill", run_id).stderr, "once killed, nothing is left to kill"


def test_a_network_link_cut_for_seconds_loses_no_line(cluster, ctl, tmp_path):
    node = cluster.names[1]
    veth = f"{cluster.prefix}-v{node.rsplit('n', 1)[1]}"
    p = ctl.ticker(cluster, 2, 250, 0.04)
    p.wait_for(" tick 1 30")
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        time.sleep(4)
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    stdout, err = p.finish(180)
    assert p.returncode == 0, err
    for rank in (0, 1):
        assert tagged_ticks(stdout, rank) == list(range(250)), f"rank {rank}"


# --- injection and secrets -----------------------------------------------------------------

def test_no_value_is_run_by_a_shell_except_setup_lines(cluster, ctl, tmp_path):
    import uuid

    mark = f"crpwned{uuid.uuid4().hex[:8]}"       # `touch <mark>`, wherever a shell would run it
    setup_marker = tmp_path / "setup-ran"
    odd = tmp_path / f"w $(touch {mark}) `touch {mark}`; touch {mark}"
    odd.mkdir()
    script = write(odd / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [
        {"host": cluster.names[0], "workdir": str(odd), "setup": f"touch {setup_marker}",
         "env": {"X": f"$(touch {mark})"}},
    ])
    r = ctl.run("up", "--env", f"Y=`touch {mark}`", str(hosts), "report.py", f"$(touch {mark})")
    assert r.returncode == 0, r.stdout + r.stderr
    ((_, rep),) = reports(r.stdout)
    assert rep["args"] == [f"$(touch {mark})"]
    assert setup_marker.exists()                 # setup lines are shell, by design
    # A python path is a path, not a command line.
    bad = hosts_file(tmp_path, [{"host": cluster.names[0], "python": f"{sys.executable}; touch {mark}"}],
                     "bad.yaml")
    r = ctl.run("up", str(bad), str(script))
    assert r.returncode == 2 and f"python {sys.executable}; touch {mark} not found" in r.stderr, r.stderr
    for where in (odd, tmp_path, Path.home(), Path("/root"), Path("/"), Path.cwd()):
        assert not (where / mark).exists(), where


def test_secrets_never_show_and_state_is_private(cluster, ctl, tmp_path):
    secret = "hf_9f8e7d6c5b4a"
    script = write(tmp_path / "ticker.py", TICKER)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=1)
    dry = ctl.run("up", "--dry-run", "--env", f"HF_TOKEN={secret}", str(hosts), str(script), "3", "0.1")
    assert dry.returncode == 0 and "HF_TOKEN" in dry.stdout and secret not in dry.stdout
    p = ctl.start("up", "--env", f"HF_TOKEN={secret}", str(hosts), str(script), "60", "0.1")
    p.wait_for(" tick 1 3")
    # Not in any command line on the nodes (where `ps` would show it).
    for n in cluster.names[:2]:
        for pid in cluster.leftover_pids(n):
            try:
                assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                pass
    out, err = p.finish(120)
    assert p.returncode == 0 and secret not in out + err
    for cmd in (["status"], ["status", "--json"], ["logs"], ["ps"]):
        r = ctl.run(*cmd)
        assert secret not in r.stdout + r.stderr
    home = tmp_path / "crhome"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for path in home.rglob("*"):
        assert secret.encode() not in path.read_bytes() if path.is_file() else True
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
