"""End-to-end: SSH setups of real sites (issue 23), on both transports.

Users with each login shell (bash, dash, zsh, tcsh, fish), made for the test and
removed after it; sshd settings changed on one node (`sshd_settings`: lines added to
its sshd_config, sshd re-reads it on SIGHUP) and restored after the test.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import node_user
from kit import REPORT, check_tags, hosts_file, write

pytestmark = pytest.mark.e2e

SHELLS = ["/bin/bash", "/bin/dash", "/usr/bin/zsh", "/usr/bin/tcsh", "/usr/bin/fish"]


@pytest.fixture
def shell_user(cluster, tmp_path) -> Iterator[Callable[[str], str]]:
    """Makes a user with the given login shell (named for this cluster, so that another
    test cluster's users on this machine are never touched); each removed at the end."""
    made: list = []

    def make(shell: str) -> str:
        cm = node_user(f"{cluster.prefix}-{Path(shell).name}", shell, tmp_path)
        made.append(cm)
        return cm.__enter__()

    yield make
    for cm in reversed(made):
        cm.__exit__(None, None, None)


def _sshd_answers(addr: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, 22), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"sshd on {addr} does not answer after its config changed")
        time.sleep(0.1)


@pytest.fixture
def sshd_settings(cluster) -> Iterator[Callable[..., None]]:
    """sshd_settings(node, *lines): add sshd_config lines on a node (sshd re-reads its
    config on SIGHUP); every node's config is restored at the end."""
    originals: dict[str, str] = {}

    def hup(name: str) -> None:
        pid = cluster.sshd_pid(name)
        assert pid, f"no sshd on {name}"
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.2)                 # it closes its listener, then re-executes itself
        _sshd_answers(cluster.addr_of(name))

    def settings(name: str, *lines: str) -> None:
        path = cluster.state / "nodes" / name / "sshd_config"
        originals.setdefault(name, path.read_text())
        # First match wins in sshd_config: the test's lines go first.
        path.write_text("".join(f"{line}\n" for line in lines) + originals[name])
        hup(name)

    yield settings
    for name, text in originals.items():
        (cluster.state / "nodes" / name / "sshd_config").write_text(text)
        hup(name)


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


# --- item 3: any login shell ------------------------------------------------------------

ODD_ARGS = ["a!b", "!!", "$HOME", "it's", "*", "100%", "x\\y", "tab\there", "{a,b}", "~", "`id`", "ünï"]


@pytest.mark.parametrize("shell", SHELLS)
def test_exec_arguments_arrive_unchanged_whatever_the_login_shell(cluster, ctl, tmp_path, shell_user, shell):
    user = shell_user(shell)
    node = cluster.names[0]
    r = exec_on(ctl, tmp_path, [node], "printf", "%s|", *ODD_ARGS, user=user)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"[{node}] " + "".join(a + "|" for a in ODD_ARGS)]
    r = exec_on(ctl, tmp_path, [node], "id", "-un", user=user)
    assert r.stdout.splitlines() == [f"[{node}] {user}"], r.stdout + r.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_setup_and_every_failure_cause_read_the_same_whatever_the_login_shell(
        cluster, ctl, tmp_path, shell_user, shell):
    user = shell_user(shell)
    node = cluster.names[0]
    # A setup line in the login shell's own words where it is of the Bourne family (bash's
    # and zsh's `source`), else in /bin/sh's.
    env_file = write(tmp_path / "env.sh", "export FROM_SETUP='set up'\n")
    source = "source" if Path(shell).name in ("bash", "zsh") else "."
    r = exec_on(ctl, tmp_path, [node], "printenv", "FROM_SETUP", user=user, setup=f"{source} {env_file}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"[{node}] set up"]

    r = exec_on(ctl, tmp_path, [node], "true", user=user, workdir="/nonexistent/clusterrun-wd")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == ["clusterrun: true did not start on 1 of 1 nodes:",
                                     f"  {node}: workdir /nonexistent/clusterrun-wd: No such file or directory"]
    r = exec_on(ctl, tmp_path, [node], "true", user=user, setup=["echo getting ready", "sh -c 'exit 3'"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == ["clusterrun: true did not start on 1 of 1 nodes:",
                                     f"  {node}: setup failed with exit code 3: getting ready"]

    script = write(tmp_path / "never.py", "print('never runs')\n")
    not_a_program = write(tmp_path / "not-a-program", "")
    not_a_program.chmod(0o644)
    for python, cause in (("/nonexistent/bin/python3", "python /nonexistent/bin/python3 not found"),
                          (str(not_a_program), f"python {not_a_program} cannot be run (Permission denied)")):
        hosts = hosts_file(tmp_path, [node], filename=f"up-{time.monotonic_ns()}.yaml", user=user, python=python)
        r = ctl.run("up", str(hosts), str(script), timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"  {node}: {cause}" in r.stderr.splitlines(), r.stderr


@pytest.mark.parametrize("shell", ["/usr/bin/tcsh", "/usr/bin/fish"])
def test_a_run_as_a_user_whose_login_shell_is_not_posix(cluster, ctl, tmp_path, shell_user, shell):
    user = shell_user(shell)
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, cluster.names[:2], user=user, nproc_per_node=1, setup="export A=1")
    r = ctl.run("up", str(hosts), str(script), "a!b", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    check_tags(r.stdout, cluster.names[:2], [1, 1])
    assert "a!b" in r.stdout


# --- item 4: a changed host key ---------------------------------------------------------

def host_block(alias: str, cluster, hostname: str, *lines: str) -> str:
    """A Host block for `alias` like the test cluster's own, then `lines` (which win: each
    is put first)."""
    ssh = cluster.home / ".ssh"
    return (f"Host {alias}\n" + "".join(f"    {line}\n" for line in lines)
            + f"    HostName {hostname}\n    User root\n    IdentityFile {ssh / 'id_ed25519'}\n"
            f"    IdentitiesOnly yes\n    UserKnownHostsFile {ssh / 'known_hosts'}\n    BatchMode yes\n")


def test_a_changed_host_key_is_refused_even_with_strict_checking_off(cluster, ctl, tmp_path, ssh_config):
    """`StrictHostKeyChecking no` in the user's config: a changed key is still refused, on
    both transports, with the command that removes the old key; an unknown one is recorded."""
    node, other = cluster.names[1], cluster.names[2]
    known = tmp_path / "known_hosts"
    # node's address recorded with another node's key: node's key has "changed"
    known.write_text(f"{cluster.addr_of(node)} "
                     + (cluster.state / "nodes" / other / "ssh_host_ed25519_key.pub").read_text())
    ssh_config(host_block("changed", cluster, cluster.addr_of(node), "StrictHostKeyChecking no",
                          f"UserKnownHostsFile {known}")
               + host_block("unknown", cluster, cluster.addr_of(other), "StrictHostKeyChecking no",
                            f"UserKnownHostsFile {known}"))
    r = exec_on(ctl, tmp_path, ["changed"], "hostname")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout == ""
    line = next(l for l in r.stderr.splitlines() if l.startswith("  changed: "))
    assert "CHANGED" in line and "ssh-keygen" in line and " -R " in line, line
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, ["changed"], filename="up.yaml")
    r = ctl.run("up", str(hosts), str(script), timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "CHANGED" in r.stderr and "nothing was started" in r.stderr
    # An unknown key under the same setting is taken and recorded, as ssh does.
    r = exec_on(ctl, tmp_path, ["unknown"], "hostname")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"[unknown] {other}"]
    assert cluster.addr_of(other) in known.read_text()


# --- item 7: SetEnv and SendEnv ---------------------------------------------------------

def test_set_env_and_send_env_reach_the_node_on_both_transports(cluster, ctl, tmp_path, ssh_config, sshd_settings):
    """The node gets the same environment through paramiko as through ssh: SendEnv's
    variables from the controller, SetEnv's, SetEnv's winning a name given by both; what
    sshd's AcceptEnv does not take is set on neither."""
    node = cluster.names[1]
    sshd_settings(node, "AcceptEnv CR_*")
    ssh_config(host_block("envnode", cluster, cluster.addr_of(node),
                          'SetEnv CR_SET=from-setenv "CR_BOTH=set env"',
                          "SendEnv CR_SENT CR_BOTH NOT_ACCEPTED"))
    ctl.env.update(CR_SENT="from the controller", CR_BOTH="sent", NOT_ACCEPTED="x", CR_NOT_SENT="y")
    r = exec_on(ctl, tmp_path, ["envnode"], "sh", "-c",
                'echo "$CR_SET|$CR_SENT|$CR_BOTH|${NOT_ACCEPTED-unset}|${CR_NOT_SENT-unset}"')
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["[envnode] from-setenv|from the controller|set env|unset|unset"]
