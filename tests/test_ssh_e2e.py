"""End-to-end: the user's own SSH setup, exactly as OpenSSH reads it (issue 11).

Every test runs on both transports (conftest parametrises every cluster test):
paramiko configured by `ssh -G`, and the system ssh client through ControlMasters.
The topology comes from scripts/testcluster: a private subnet behind node 1
(crt-p1, crt-p2; the root namespace has an `unreachable` route to it, so only a
bastion gets there), crt-q1 behind crt-p1 (two bastions), node 1's sshd also on
port 2222, IPv6 ULA addresses on the bridge, a user CA and a host CA.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kit import REPORT, TICKER, assert_nothing_left, check_tags, hosts_file, reports, up, write

pytestmark = pytest.mark.e2e



def transport() -> str:
    return os.environ.get("CLUSTERRUN_TRANSPORT", "paramiko")


def key_of(cluster, name: str) -> str:
    """`type base64` of a node's host key."""
    kt, kb = (cluster.state / "nodes" / name / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    return f"{kt} {kb}"


def block(alias: str, cluster, hostname: str, *lines: str) -> str:
    """A Host block like the test cluster's own, plus `lines`."""
    ssh = cluster.home / ".ssh"
    base = [f"HostName {hostname}", "User root", f"UserKnownHostsFile {ssh / 'known_hosts'}",
            "StrictHostKeyChecking yes", "BatchMode yes"]
    keys = [l.split()[0].lower() for l in lines]
    base = [b for b in base if b.split()[0].lower() not in keys]
    if not any(k in ("identityfile", "identitiesonly") for k in keys):
        base += [f"IdentityFile {ssh / 'id_ed25519'}", "IdentitiesOnly yes"]
    return f"Host {alias}\n" + "".join(f"    {l}\n" for l in base + list(lines))


def exec_hostname(ctl, tmp_path, hosts: list, **top) -> subprocess.CompletedProcess[str]:
    path = hosts_file(tmp_path, hosts, filename=f"hosts-{time.monotonic_ns()}.yaml", **top)
    return ctl.run("exec", str(path), "--", "hostname", timeout=120)


def assert_runs_on(ctl, tmp_path, alias: str, hostname: str) -> None:
    """`exec hostname` on the one node `alias` succeeds there, on the machine `hostname`."""
    r = exec_hostname(ctl, tmp_path, [alias])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"[{alias}] {hostname}"]


def private(cluster, name: str) -> str:
    return next(addr for n, addr, _ in cluster.private if n == name)


# --- the config as OpenSSH reads it ---------------------------------------------------

def test_an_included_config_is_honoured(cluster, ctl, tmp_path, ssh_config):
    confd = tmp_path / "config.d"
    confd.mkdir()
    (confd / "team.conf").write_text(block("inc-node", cluster, cluster.addrs[1]))
    ssh_config(f"Include {confd}/*.conf\n")
    assert_runs_on(ctl, tmp_path, "inc-node", cluster.names[1])


def test_a_config_openssh_rejects_gets_its_own_message_and_no_traceback(cluster, ctl, tmp_path, ssh_config):
    ssh_config("Host broken\n    HostName 10.0.0.1\n    NoSuchKeyword yes\n")
    r = exec_hostname(ctl, tmp_path, [cluster.names[0], "broken"])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "Bad configuration option" in r.stderr or "bad configuration option" in r.stderr.lower()


def test_proxy_command_is_used_to_reach_a_private_node(cluster, ctl, tmp_path, ssh_config):
    # A direct connection to the private subnet fails on this machine (unreachable
    # route): only the ProxyCommand through the bastion gets there.
    bastion = cluster.names[0]
    ssh_config(block("pc-node", cluster, private(cluster, f"{cluster.prefix}-p1"),
                     f"ProxyCommand ssh -W %h:%p {bastion}"))
    assert_runs_on(ctl, tmp_path, "pc-node", f"{cluster.prefix}-p1")


def test_a_failing_proxy_command_is_named_with_its_own_words(cluster, ctl, tmp_path, ssh_config):
    ssh_config(block("pc-bad", cluster, "10.0.0.1", "ProxyCommand sh -c 'echo no tunnel for %h >&2; exit 3'"))
    r = exec_hostname(ctl, tmp_path, [cluster.names[0], "pc-bad"])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "pc-bad: " in r.stderr and "Traceback" not in r.stderr
    assert f"[{cluster.names[0]}] {cluster.names[0]}" in r.stdout      # the other node ran it
    if transport() == "paramiko":
        assert "no tunnel for 10.0.0.1" in r.stderr


def test_a_training_run_behind_a_bastion(cluster, tmp_path):
    p1, p2 = f"{cluster.prefix}-p1", f"{cluster.prefix}-p2"
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [p1, p2], nproc_per_node=2)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    got = reports(r.stdout)
    assert sorted(rep["rank"] for _, rep in got) == [0, 1, 2, 3]
    assert {tag["node"] for tag, _ in got} == {p1, p2}
    assert all(tag["node"] == rep["hostname"] for tag, rep in got)


def test_a_chain_of_two_bastions_and_a_run_across_them(cluster, tmp_path, ctl):
    p1, q1 = f"{cluster.prefix}-p1", f"{cluster.prefix}-q1"
    assert_runs_on(ctl, tmp_path, q1, q1)
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [p1, q1], nproc_per_node=1)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    assert {tag["node"] for tag, _ in reports(r.stdout)} == {p1, q1}


@pytest.mark.parametrize("syntax", ["user@host:port", "ssh://user@host:port", "alias,alias"])
def test_proxy_jump_in_every_syntax(cluster, ctl, tmp_path, ssh_config, syntax):
    n1 = cluster.addrs[0]
    p1, p2 = private(cluster, f"{cluster.prefix}-p1"), private(cluster, f"{cluster.prefix}-p2")
    known = cluster.home / ".ssh" / "known_hosts"
    # node 1's sshd on port 2222: OpenSSH records non-22 ports as [host]:port
    with known.open("a") as f:
        f.write(f"[{n1}]:2222 {key_of(cluster, cluster.names[0])}\n")
    jump, target = {
        "user@host:port": (f"root@{n1}:2222", p2),
        "ssh://user@host:port": (f"ssh://root@{n1}:2222", p2),
        # q1 through n1 then p1 by address: a two-hop list written out
        "alias,alias": (f"{cluster.names[0]},{p1}", private(cluster, f"{cluster.prefix}-q1")),
    }[syntax]
    ssh_config(block("pj-node", cluster, target, f"ProxyJump {jump}")
               + block(p1, cluster, p1))
    r = exec_hostname(ctl, tmp_path, ["pj-node"])
    assert r.returncode == 0, r.stdout + r.stderr
    want = f"{cluster.prefix}-q1" if syntax == "alias,alias" else f"{cluster.prefix}-p2"
    assert r.stdout.splitlines() == [f"[pj-node] {want}"]


def test_a_node_on_another_port_from_the_hosts_file(cluster, ctl, tmp_path):
    # node 1's sshd listens on 2222 too; known_hosts records it as [addr]:2222
    r = exec_hostname(ctl, tmp_path, [{"host": cluster.addrs[0], "port": 2222, "name": "on-2222"}])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"[on-2222] {cluster.names[0]}"]


# On openssh each node's ControlMaster runs its own ProxyJump: sharing is the paramiko stack's.
@pytest.mark.transports("paramiko")
def test_nodes_behind_one_bastion_share_one_connection_to_it(cluster, ctl, tmp_path, ssh_config):
    p1, p2 = private(cluster, f"{cluster.prefix}-p1"), private(cluster, f"{cluster.prefix}-p2")
    aliases = {"b1": p1, "b2": p2, "b3": p1, "b4": p2}
    ssh_config("".join(block(a, cluster, addr, f"ProxyJump {cluster.names[0]}") for a, addr in aliases.items()))
    script = write(tmp_path / "ticker.py", TICKER)
    hosts = hosts_file(tmp_path, list(aliases))
    run = ctl.start("up", str(hosts), str(script), "600", "0.2")
    try:
        for rank in range(4):                          # every node connected and streaming
            run.wait_for(f"tick {rank} 1")
        out = cluster.run_on(cluster.names[0], "ss", "-Htn", "state", "established", "( sport = :22 )",
                             check=True).stdout
        peers = [l for l in out.splitlines() if l.strip()]
        assert len(peers) == 1, out
    finally:
        run.proc.send_signal(2)                        # Ctrl-C: tear the run down
        run.finish()
    assert_nothing_left(cluster)


# --- identities ----------------------------------------------------------------------

def test_an_agent_with_more_keys_than_max_auth_tries_and_identities_only(cluster, ctl, tmp_path, ssh_config):
    sock = tmp_path / "agent.sock"
    agent = subprocess.run(["ssh-agent", "-a", str(sock)], capture_output=True, text=True, check=True)
    pid = int(re.search(r"SSH_AGENT_PID=(\d+)", agent.stdout).group(1))
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        for i in range(8):                     # eight wrong keys first, then the right one
            k = tmp_path / f"wrong{i}"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
            subprocess.run(["ssh-add", "-q", str(k)], env=env, check=True, capture_output=True)
        right = cluster.home / ".ssh" / "id_ed25519"
        subprocess.run(["ssh-add", "-q", str(right)], env=env, check=True, capture_output=True)
        pub = tmp_path / "only-public" / "node.pub"      # the 1Password pattern: no private file
        pub.parent.mkdir()
        shutil.copyfile(str(right) + ".pub", pub)
        ssh_config(block("agent-node", cluster, cluster.addrs[1], f"IdentityAgent {sock}",
                         "IdentitiesOnly yes", f"IdentityFile {pub}"))
        assert_runs_on(ctl, tmp_path, "agent-node", cluster.names[1])
    finally:
        os.kill(pid, 15)


def test_a_user_certificate_with_its_own_file_name(cluster, ctl, tmp_path, ssh_config):
    ssh = cluster.home / ".ssh"
    ssh_config(block("cert-node", cluster, cluster.addrs[2], f"IdentityFile {ssh / 'id_cert'}",
                     f"CertificateFile {ssh / 'usercert.pub'}", "IdentitiesOnly yes"))
    assert_runs_on(ctl, tmp_path, "cert-node", cluster.names[2])


def test_without_its_certificate_the_same_key_is_refused(cluster, ctl, tmp_path, ssh_config):
    ssh = cluster.home / ".ssh"
    ssh_config(block("nocert-node", cluster, cluster.addrs[2], f"IdentityFile {ssh / 'id_cert'}",
                     "IdentitiesOnly yes"))
    r = exec_hostname(ctl, tmp_path, ["nocert-node"])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "nocert-node: " in r.stderr and "Traceback" not in r.stderr


# --- host keys ------------------------------------------------------------------------

def test_marker_lines_for_other_hosts_change_nothing(cluster, ctl, tmp_path, ssh_config):
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                           check=True)
    del other
    other_key = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority *.corp.example {other_key}\n"
                     f"@revoked old-box.example {other_key}\n"
                     + (cluster.home / ".ssh" / "known_hosts").read_text())
    ssh_config(block("marked", cluster, cluster.addrs[1], f"UserKnownHostsFile {known}"))
    r = exec_hostname(ctl, tmp_path, ["marked", cluster.names[2]])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[marked] {cluster.names[1]}" in r.stdout.splitlines()


def test_a_revoked_host_key_is_refused_naming_the_node(cluster, ctl, tmp_path, ssh_config):
    known = tmp_path / "known_hosts"
    known.write_text(f"@revoked * {key_of(cluster, cluster.names[1])}\n"
                     + (cluster.home / ".ssh" / "known_hosts").read_text())
    ssh_config(block("revoked-node", cluster, cluster.addrs[1], f"UserKnownHostsFile {known}"))
    r = exec_hostname(ctl, tmp_path, [cluster.names[0], "revoked-node"])
    assert r.returncode == 3, r.stdout + r.stderr
    line = next(l for l in r.stderr.splitlines() if "revoked-node: " in l)
    assert "revoked" in line.lower() or "REVOKED" in r.stderr
    assert f"[{cluster.names[0]}] {cluster.names[0]}" in r.stdout
    assert "[revoked-node]" not in r.stdout


def test_a_host_trusted_only_through_a_cert_authority(cluster, ctl, tmp_path, ssh_config):
    known = tmp_path / "known_hosts"
    shutil.copyfile(cluster.state / "known_hosts_ca", known)
    ssh_config(block("ca-node", cluster, cluster.addrs[1], f"UserKnownHostsFile {known}"))
    r = exec_hostname(ctl, tmp_path, ["ca-node"])
    if transport() == "openssh":
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines() == [f"[ca-node] {cluster.names[1]}"]
    else:                      # paramiko cannot check host certificates: refused, saying what to do
        assert r.returncode == 3, r.stdout + r.stderr
        assert "ca-node: " in r.stderr and "@cert-authority" in r.stderr
        assert "transport: openssh" in r.stderr


def test_host_key_alias_is_the_name_looked_up(cluster, ctl, tmp_path, ssh_config):
    known = tmp_path / "known_hosts"
    known.write_text(f"the-alias {key_of(cluster, cluster.names[1])}\n")
    ssh_config(block("aliased", cluster, cluster.addrs[1], f"UserKnownHostsFile {known}",
                     "HostKeyAlias the-alias"))
    assert_runs_on(ctl, tmp_path, "aliased", cluster.names[1])


def test_connect_timeout_from_the_ssh_config(cluster, ctl, tmp_path, ssh_config):
    # An address on our own test bridge (whatever its subnet) where no node answers: packets go nowhere.
    ssh_config(block("silent", cluster, cluster.addrs[0].rsplit(".", 1)[0] + ".250", "ConnectTimeout 1"))
    r = exec_hostname(ctl, tmp_path, [cluster.names[0], "silent"])
    assert r.returncode == 3, r.stdout + r.stderr
    line = next(l for l in r.stderr.splitlines() if "silent: " in l)
    if transport() == "paramiko":
        assert "timed out after 1s" in line
    else:
        assert "timed out" in line.lower()


# --- users and addresses --------------------------------------------------------------

def test_a_run_as_a_non_root_user(cluster, tmp_path, crtuser):
    script = write(tmp_path / "report.py", REPORT + '    import getpass; print("USER " + getpass.getuser())\n')
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2, user=crtuser)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    check_tags(r.stdout, cluster.names[:2], [2, 2])
    users = {l.rsplit(" ", 1)[-1] for l in r.stdout.splitlines() if "] USER " in l}
    assert users == {crtuser}


def test_ipv6_nodes_in_check_and_up(cluster, ctl, tmp_path):
    v6 = [cluster.v6[n] for n in cluster.names[:2]]
    entries = [{"host": addr, "name": name} for addr, name in zip(v6, cluster.names[:2])]
    hosts = hosts_file(tmp_path, entries, nproc_per_node=2)
    r = ctl.run("check", str(hosts))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"MASTER_ADDR {v6[0]}" in r.stdout
    rows = [l for l in r.stdout.splitlines() if l.startswith(cluster.prefix + "-n")]
    assert len(rows) == 2 and all("eth0" in row and row.endswith("ok") for row in rows), r.stdout
    script = write(tmp_path / "report.py", REPORT)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    check_tags(r.stdout, cluster.names[:2], [2, 2])


def test_exec_with_a_dead_node_exits_non_zero_naming_it(cluster, ctl, tmp_path, ssh_config):
    ssh_config(block("dead", cluster, cluster.addrs[0], "Port 2223"))
    r = exec_hostname(ctl, tmp_path, [cluster.names[1], "dead"], connect_timeout=3)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "dead: " in r.stderr and "refused" in r.stderr.lower()
    assert f"[{cluster.names[1]}] {cluster.names[1]}" in r.stdout


# --- what a login prints ------------------------------------------------------------

BANNER = ('echo "D is for deploy: welcome to $(hostname)"\n'
          'echo "S 1 2 3"\n'
          "printf 'conda: no newline at the end'\n")


def test_a_login_banner_is_shown_apart_and_never_taken_for_the_agents_output(cluster, ctl, tmp_path, crtuser):
    """Lines a .bashrc prints (even ones that look like the agent's frames, one without
    its newline) and a setup line that reads stdin change nothing in the run; the
    banner is shown as the node's own lines and kept in its login log."""
    home = Path(f"/home/{crtuser}")
    (home / ".bashrc").write_text(BANNER)
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2, user=crtuser,
                       setup="head -c 10 >/dev/null")      # reads stdin, which carries the agent
    r = ctl.run("up", str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    check_tags(r.stdout, cluster.names[:2], [2, 2])
    for name in cluster.names[:2]:
        assert f"[{name}] D is for deploy: welcome to {name}" in r.stdout.splitlines()
        assert f"[{name}] conda: no newline at the end" in r.stdout.splitlines()
    (run,) = (tmp_path / "crhome" / "runs").iterdir()
    assert "D is for deploy" in (run / "logs" / "node0.login.log").read_text()
    assert "D is for deploy" not in (run / "logs" / "node0.log").read_text()


def test_after_a_reattach_a_login_banner_costs_no_line(cluster, ctl, tmp_path, crtuser):
    (Path(f"/home/{crtuser}") / ".bashrc").write_text(BANNER)
    script = write(tmp_path / "ticker.py", TICKER)
    hosts = hosts_file(tmp_path, cluster.names[:2], user=crtuser)
    p = ctl.start("up", str(hosts), str(script), "60", "0.1")
    p.wait_for("tick 1 5")
    p.proc.kill()                                     # nobody collects the run for a while
    p.finish()
    r = ctl.run("logs", "-f", timeout=180)            # reattaches, resumes at the offsets
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = (tmp_path / "crhome" / "runs").iterdir()
    for rank in (0, 1):
        lines = (run / "logs" / f"rank{rank}.log").read_text().splitlines()
        assert [l for l in lines if l.startswith("tick")] == [f"tick {rank} {i}" for i in range(60)]
        assert lines[-1] == f"done {rank}"
    node_log = (run / "logs" / "node0.log").read_text()
    assert "conda:" not in node_log and "D is for deploy" not in node_log
