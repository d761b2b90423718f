"""The OpenSSH transport (clusterrun/transports/openssh.py).

Without a cluster: control socket paths, the private socket directory, and the
session process class driven by a local command. On the sshd test cluster
(e2e): sessions over one ControlMaster per node, its reuse and its end, and
ssh's own messages when a node cannot be reached.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from clusterrun.transports import openssh
from clusterrun.errors import UnreachableError
from clusterrun.transports.openssh import OpenSSHProcess, OpenSSHTransport, connect_openssh, control_path

e2e = pytest.mark.e2e
# These tests drive the OpenSSH transport directly: once is enough (conftest
# would otherwise run every test that uses `cluster` on both transports).
pytestmark = pytest.mark.transports("openssh")
RUN = uuid.uuid4().hex[:8]      # scopes of this test session: a master left by another is never ours


# --- without a cluster ------------------------------------------------------------

@pytest.fixture
def cm_dir(tmp_path, monkeypatch) -> Path:
    """Control sockets under tmp_path for this test."""
    monkeypatch.setattr(openssh, "CONTROL_DIR", str(tmp_path / "cm-{uid}"))
    return tmp_path / f"cm-{os.getuid()}"


def test_control_path_is_short_stable_and_distinct(cm_dir):
    p = control_path("run-1", "gpu-a", "alice", 22)
    assert p == control_path("run-1", "gpu-a", "alice", 22)
    assert os.path.dirname(p) == str(cm_dir) and re.fullmatch(r"[0-9a-f]{20}", os.path.basename(p))
    others = {control_path("run-2", "gpu-a", "alice", 22), control_path("run-1", "gpu-b", "alice", 22),
              control_path("run-1", "gpu-a", None, 22), control_path("run-1", "gpu-a", "alice", None)}
    assert p not in others and len(others) == 4
    assert cm_dir.stat().st_mode & 0o777 == 0o700
    # The real directory: OpenSSH appends ~17 characters to a path that must fit in ~104.
    longest = "/tmp/clusterrun-cm-4294967295/" + "0" * 20
    assert len(longest) + 17 < 104


def test_a_control_directory_others_can_use_is_refused(cm_dir, monkeypatch):
    cm_dir.mkdir(mode=0o755)
    cm_dir.chmod(0o755)
    with pytest.raises(UnreachableError, match="not a directory private to you"):
        control_path("s", "t", None, None)
    monkeypatch.setattr(openssh, "_ssh", lambda name: "/bin/false")
    with pytest.raises(UnreachableError, match=r"^node9: .*not a directory private to you"):
        connect_openssh("node9", "gpu-a", user=None, port=None, identity_file=None, timeout=5,
                        accept_new=False, scope="s", persist=False)


def test_no_ssh_on_path_names_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UnreachableError, match=r"^node9: .*no `ssh` is on PATH"):
        connect_openssh("node9", "gpu-a", user=None, port=None, identity_file=None, timeout=5,
                        accept_new=False, scope="s", persist=False)


def local(script: str, merge_stderr: bool = False) -> OpenSSHProcess:
    """The session class around a local command instead of ssh."""
    return OpenSSHProcess(["sh", "-c", script], merge_stderr)


def test_process_stdin_stdout_exit_code_and_stderr():
    p = local("cat; echo oops >&2; exit 3")
    p.send(b"hello\n")
    p.close_stdin()
    assert p.stdout.read() == b"hello\n"
    assert p.wait(5) == 3
    assert p.stderr_text() == "oops\n"
    p.close()


def test_process_merged_stderr_and_read_some():
    p = local("echo out; sleep 0.2; echo err >&2", merge_stderr=True)
    got = b""
    while chunk := p.read_some(65536):
        got += chunk
    assert got == b"out\nerr\n" and p.wait(5) == 0 and p.stderr_text() == ""
    p.close()


def test_process_read_timeout_on_read_some_and_readline():
    p = local("echo first; exec sleep 30")
    p.set_read_timeout(0.3)
    assert p.stdout.readline() == b"first\n"
    for read in (p.stdout.readline, lambda: p.read_some(10)):
        t0 = time.monotonic()
        with pytest.raises(socket.timeout):
            read()
        assert 0.25 < time.monotonic() - t0 < 2
    assert p.wait(0.1) is None          # wait with a timeout: still running
    p.close()
    assert p._p.poll() is not None      # close() ended it


# --- on the test cluster ----------------------------------------------------------

@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """The cluster's ssh wrapper first on PATH; every master a test opens is ended after it."""
    monkeypatch.setenv("PATH", f"{cluster.home / 'bin'}{os.pathsep}{os.environ['PATH']}")
    opened: list[OpenSSHTransport] = []

    def connect(name: str, target: str | None = None, *, scope: str | None = None,
                persist: bool = False, timeout: float | None = None, **kw) -> OpenSSHTransport:
        args = dict(user=None, port=None, identity_file=None, accept_new=False)
        args.update(kw)
        t = connect_openssh(name, target or name, timeout=timeout, scope=scope or uuid.uuid4().hex,
                            persist=persist, **args)
        opened.append(t)
        return t

    yield connect
    pids = [master_pid(t) for t in opened]
    for t in opened:
        t.close()
        openssh._control(t._ssh, "exit", t._common, t._target)
    for pid in pids:
        if pid:
            wait_gone(pid)


def master_pid(t: OpenSSHTransport) -> int | None:
    r = subprocess.run([t._ssh, "-O", "check", *t._common, "--", t._target],
                       capture_output=True, text=True, timeout=10)
    m = re.search(r"pid=(\d+)", r.stderr)
    return int(m.group(1)) if r.returncode == 0 and m else None


def wait_gone(pid: int, timeout: float = 5) -> bool:
    """The process has exited (a zombie counts: the master's parent is init, which reaps when it will)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def run(t: OpenSSHTransport, command: str, merge_stderr: bool = False) -> tuple[bytes, int | None, str]:
    p = t.exec(command, merge_stderr)
    p.close_stdin()
    out = p.stdout.read()
    code = p.wait(10)
    err = p.stderr_text()
    p.close()
    return out, code, err


def ssh_connections(cluster, name: str) -> int:
    """Established connections to the node's sshd."""
    r = cluster.run_on(name, "ss", "-Htn", "state", "established", "( sport = :22 )", check=True)
    return len(r.stdout.splitlines())


@e2e
def test_exec_runs_in_the_login_shell_with_stdin_stdout_stderr_and_exit_code(cluster, on_cluster):
    name = cluster.names[0]
    t = on_cluster(name)
    assert run(t, 'echo $((1+2)) "a  b" | tr a-z A-Z; hostname') == (f"3 A  B\n{name}\n".encode(), 0, "")
    assert run(t, "echo out; echo err >&2; exit 7") == (b"out\n", 7, "err\n")
    assert run(t, "echo out; echo err >&2", merge_stderr=True)[:2] == (b"out\nerr\n", 0)
    p = t.exec("tr a-z A-Z")
    p.send(b"hello ~.\n")           # no escape character: every byte reaches the command
    p.send(b"world\n")
    p.close_stdin()
    assert p.stdout.read() == b"HELLO ~.\nWORLD\n" and p.wait(10) == 0
    p.close()
    assert run(t, "kill -9 $$")[1] == 255   # killed by a signal: ssh says 255
    assert t.alive()


@e2e
def test_read_timeout_and_wait_timeout(cluster, on_cluster):
    t = on_cluster(cluster.names[0], persist=True)
    pid = master_pid(t)
    p = t.exec("echo ready; exec cat")    # silent until its stdin closes (close() does)
    assert p.stdout.readline() == b"ready\n"
    p.set_read_timeout(0.5)
    with pytest.raises(socket.timeout):
        p.read_some(100)
    assert p.wait(0.2) is None
    p.close()
    # A session went silent: the link may be dead, so even a run's master is not kept for reuse.
    t.close(linger=True)
    assert wait_gone(pid)


@e2e
def test_one_master_carries_every_session(cluster, on_cluster):
    name = cluster.names[0]
    before = ssh_connections(cluster, name)
    t = on_cluster(name)
    time.sleep(0.5)                     # holding the master runs nothing on the node
    assert [d for d in cluster.describe_pids(cluster.leftover_pids(name)) if " sshd: " not in d] == []
    procs = [t.exec("echo up; exec cat") for _ in range(6)]
    for p in procs:
        assert p.stdout.readline() == b"up\n"
    assert ssh_connections(cluster, name) == before + 1
    for p in procs:
        p.close()


@e2e
def test_a_live_master_is_reused_in_the_same_scope_only(cluster, on_cluster):
    name = cluster.names[0]
    a = on_cluster(name, scope=f"{RUN}-run-a", persist=True)
    pid = master_pid(a)
    a.close(linger=True)                # handed over: the master stays for whoever comes next
    assert pid and master_pid(a) == pid
    b = on_cluster(name, scope=f"{RUN}-run-a", persist=True)
    assert master_pid(b) == pid and run(b, "echo hi")[:2] == (b"hi\n", 0)
    c = on_cluster(name, scope=f"{RUN}-run-c", persist=True)
    assert master_pid(c) not in (None, pid)


@e2e
def test_close_without_persist_leaves_nothing(cluster, on_cluster):
    name = cluster.names[0]
    t = on_cluster(name)
    pid = master_pid(t)
    assert pid and run(t, "true")[1] == 0
    t.close()
    assert wait_gone(pid), f"master {pid} still running"
    assert not os.path.exists(t.control_path)
    deadline = time.monotonic() + 5
    while cluster.leftover_pids(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.leftover_pids(name) == [], cluster.describe_pids(cluster.leftover_pids(name))


@e2e
def test_a_lost_master_is_seen_and_no_session_goes_around_it(cluster, on_cluster):
    t = on_cluster(cluster.names[0], scope=f"{RUN}-lost")
    pid = master_pid(t)
    os.kill(pid, 9)
    deadline = time.monotonic() + 20        # bounded; a loaded machine may take a while
    while t.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not t.alive()
    with pytest.raises(UnreachableError, match=f"^{cluster.names[0]}: the SSH connection was lost"):
        t.exec("true")
    # The next connect in that scope replaces the dead master (its socket is stale).
    u = on_cluster(cluster.names[0], scope=f"{RUN}-lost")
    assert run(u, "echo back")[:2] == (b"back\n", 0)


@e2e
def test_peer_addr_is_the_address_sshd_saw(cluster, on_cluster):
    name = cluster.names[1]
    assert on_cluster(name).peer_addr == cluster.addr_of(name)


@e2e
def test_peer_addr_behind_a_bastion_is_the_nodes_own(cluster, on_cluster):
    private = getattr(cluster, "private", [])
    if not private:
        pytest.skip("this test cluster has no node behind a bastion")
    name = private[0][0]
    t = on_cluster(name)
    assert t.peer_addr == cluster.addr_of(name)
    assert run(t, "hostname")[:2] == (f"{name}\n".encode(), 0)


@e2e
def test_unreachable_nodes_get_ssh_own_message(cluster, on_cluster):
    name, addr = cluster.nodes[0]
    with pytest.raises(UnreachableError) as e:
        on_cluster("closed", addr, port=1, timeout=5)
    assert re.match(r"closed: ssh: connect to host \S+ port 1: Connection refused", str(e.value)), e.value
    silent = addr.rsplit(".", 1)[0] + ".250"    # on the test bridge, where nobody answers
    t0 = time.monotonic()
    with pytest.raises(UnreachableError) as e:
        on_cluster("ghost", silent, timeout=2)
    assert time.monotonic() - t0 < 2 + openssh.AUTH_GRACE_TTY + 1
    assert str(e.value).startswith(f"ghost: ssh: connect to host {silent} port 22: "), e.value


def host_key(cluster, addr: str) -> str:
    """'type base64' of the node at addr, from the cluster's known_hosts."""
    for line in (cluster.home / ".ssh" / "known_hosts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and addr in fields[0].split(","):
            return f"{fields[1]} {fields[2]}"
    raise KeyError(addr)


def alias_config(cluster, tmp_path: Path, monkeypatch, known_hosts: str, extra: str = "",
                 identity: bool = True) -> Path:
    """An ssh on PATH whose config has Host `impostor` -> node 1, with these known_hosts."""
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts)
    config = tmp_path / "config"
    config.write_text(
        f"Host impostor\n  HostName {cluster.addrs[0]}\n  User nobody\n"
        + (f"  IdentityFile {cluster.home / '.ssh' / 'id_ed25519'}\n" if identity else "")
        + f"  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n" + extra)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F "{config}" "$@"\n')
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return known


@e2e
def test_a_changed_host_key_is_refused_with_ssh_message(cluster, on_cluster, tmp_path, monkeypatch):
    other = host_key(cluster, cluster.addrs[1])
    alias_config(cluster, tmp_path, monkeypatch, f"{cluster.addrs[0]} {other}\n")
    with pytest.raises(UnreachableError) as e:
        on_cluster("node1", "impostor", user="root", accept_new=True)  # accept-new never accepts a change
    msg = str(e.value)
    assert msg.startswith("node1: ") and "has changed" in msg and "Host key verification failed." in msg


@e2e
def test_an_unknown_host_key_is_refused_then_accepted_when_asked(cluster, on_cluster, tmp_path, monkeypatch):
    known = alias_config(cluster, tmp_path, monkeypatch, "")
    with pytest.raises(UnreachableError) as e:
        on_cluster("node1", "impostor", user="root")
    msg = str(e.value)
    assert msg.startswith("node1: unknown host key (No ") and "host key is known" in msg
    assert "--accept-new-host-keys" in msg
    t = on_cluster("node1", "impostor", user="root", accept_new=True)
    assert run(t, "hostname")[:2] == (f"{cluster.names[0]}\n".encode(), 0)
    assert host_key(cluster, cluster.addrs[0]).split()[1] in known.read_text()


@e2e
def test_parallel_connects_in_one_scope_share_one_master(cluster, on_cluster):
    name = cluster.names[0]
    before = ssh_connections(cluster, name)
    got: list[OpenSSHTransport] = []
    threads = [threading.Thread(target=lambda: got.append(on_cluster(name, scope=f"{RUN}-same")))
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(got) == 4 and len({master_pid(t) for t in got}) == 1
    assert ssh_connections(cluster, name) == before + 1
    for t in got[:3]:
        t.close()                       # not the last holder: the master stays
    assert run(got[3], "echo still")[:2] == (b"still\n", 0)


@e2e
def test_the_hosts_file_wins_and_our_command_runs_whatever_the_config_says(
        cluster, on_cluster, tmp_path, monkeypatch):
    key = host_key(cluster, cluster.addrs[0])
    alias_config(cluster, tmp_path, monkeypatch, f"{cluster.addrs[0]} {key}\n",
                 extra="  Port 1\n  RemoteCommand echo from-config\n  ControlMaster auto\n",
                 identity=False)
    t = on_cluster("node1", "impostor", user="root", port=22,
                   identity_file=str(cluster.home / ".ssh" / "id_ed25519"))
    assert run(t, "echo $USER mine", merge_stderr=True)[:2] == (b"root mine\n", 0)


@e2e
def test_proxyjump_goes_through_the_bastion_and_peer_addr_is_the_nodes(
        cluster, on_cluster, tmp_path, monkeypatch):
    bastion, node = cluster.addrs[0], cluster.addrs[1]
    keys = "".join(f"{a} {host_key(cluster, a)}\n" for a in (bastion, node))
    auth = (f"  User root\n  IdentityFile {cluster.home / '.ssh' / 'id_ed25519'}\n"
            f"  UserKnownHostsFile {tmp_path / 'known_hosts'}\n  BatchMode yes\n")
    alias_config(cluster, tmp_path, monkeypatch, keys,
                 extra=f"Host behind\n  HostName {node}\n  ProxyJump {bastion}\n{auth}Host {bastion}\n{auth}")
    t = on_cluster("node2", "behind")
    assert t.peer_addr == node
    out, code, _ = run(t, 'echo "$SSH_CONNECTION"')
    assert code == 0 and out.split()[0] == bastion.encode()     # sshd saw the bastion connect


@e2e
def test_close_ends_the_sessions_it_carries_even_when_the_master_stays(cluster, on_cluster):
    t = on_cluster(cluster.names[0], persist=True)
    p = t.exec("echo up; exec cat")
    assert p.stdout.readline() == b"up\n"
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(p.stdout.read()))
    reader.start()
    t.close()                           # another thread still reads: it sees the end
    reader.join(10)
    assert not reader.is_alive() and got == [b""] and p.wait(1) is not None
    p.close()
