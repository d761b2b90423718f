"""Sanity checks of the SSH test cluster itself (scripts/testcluster)."""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# These check the test cluster, not clusterrun: once is enough, not once per transport.
pytestmark = [pytest.mark.e2e, pytest.mark.no_transport]


def test_ssh_to_node_prints_its_hostname(cluster):
    node = cluster.names[1]
    res = subprocess.run(
        ["ssh", "-F", str(cluster.home / ".ssh" / "config"), "-o", "BatchMode=yes",
         node, "hostname"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == node
    assert cluster.hostname_of(node) == node


def test_plain_ssh_with_cluster_env(cluster):
    # env() puts an ssh wrapper first on PATH (OpenSSH ignores $HOME)
    last = cluster.names[-1]
    res = subprocess.run(
        ["ssh", last, 'echo "$(hostname) $HOME"'],
        env=cluster.env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == last
    assert not cluster.wait_no_leftovers(timeout=10)


def test_nodes_reach_each_other_over_the_bridge(cluster):
    code = (
        "import socket, sys\n"
        "for addr in sys.argv[1:]:\n"
        "    with socket.create_connection((addr, 22), timeout=5) as s:\n"
        "        assert s.recv(4).startswith(b'SSH-'), addr\n"
    )
    n1, n2 = cluster.names[:2]
    # n2's sshd, seen from n1
    res = subprocess.run(
        ["ip", "netns", "exec", n1, sys.executable, "-c", code, cluster.addr_of(n2)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    # and over ssh: node n1 talks TCP to n2 (bash /dev/tcp)
    res = cluster.ssh(n1, f"exec 3<>/dev/tcp/{cluster.addr_of(n2)}/22 && head -c 4 <&3")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "SSH-"


def test_node_hostname_does_not_resolve_to_its_cluster_address(cluster):
    """The real-world trap: `hostname` on a node is not its cluster address.

    The node names are deliberately not in /etc/hosts and the namespaces have
    no route to any DNS server, so resolving the node's own hostname fails
    (or, on some machines, yields something else) -- a launcher must not
    derive a node's address from `hostname`.
    """
    nsswitch = Path("/etc/nsswitch.conf")
    if nsswitch.exists() and any(
        line.split()[:1] == ["hosts:"] and "myhostname" in line
        for line in nsswitch.read_text().splitlines()
    ):
        reason = "nss-myhostname resolves the local hostname to local addresses here"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must run every test)")
        pytest.skip(reason)
    name, addr = cluster.nodes[0]
    res = cluster.ssh(name, 'h=$(hostname); echo "$h"; getent hosts "$h"; echo "rc=$?"')
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == name
    assert lines[-1] != "rc=0" or addr not in res.stdout, res.stdout


@pytest.mark.skipif(shutil.which("pdsh") is None and os.environ.get("CI") != "true",
                    reason="pdsh not installed (scripts/setup --test installs it)")
def test_pdsh_over_ssh_reaches_every_node(cluster):
    res = subprocess.run(
        ["pdsh", "-R", "ssh", "-w", ",".join(cluster.names), "hostname"],
        env=cluster.env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    got = sorted(line.split(": ", 1) for line in res.stdout.splitlines())
    assert got == sorted([n, n] for n in cluster.names)


# ------------------------------------------------------------------------
# The topology issue 11 needs: a bastion with a private subnet, a chain of
# two bastions, a second port, IPv6, a user CA and a host CA. Checked with
# OpenSSH's own ssh and STATE/ssh_config, the file scripts/testcluster writes.

BANNER_CODE = (
    "import socket, sys\n"
    "for addr in sys.argv[1:]:\n"
    "    with socket.create_connection((addr, 22), timeout=5) as s:\n"
    "        assert s.recv(4).startswith(b'SSH-'), addr\n"
)


def _ssh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout,
    )


def _state_ssh(cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """ssh -F STATE/ssh_config ARGS..."""
    return _ssh("-F", str(cluster.state / "ssh_config"), *args)


def test_private_nodes_are_reached_through_their_bastions(cluster):
    prefix = cluster.prefix
    assert [(n, via) for n, _, via in cluster.private] == [
        (f"{prefix}-p1", f"{prefix}-n1"),
        (f"{prefix}-p2", f"{prefix}-n1"),
        (f"{prefix}-q1", f"{prefix}-n1,{prefix}-p1"),
    ]
    for name in cluster.private_names:  # q1: controller -> n1 -> p1 -> q1
        res = _state_ssh(cluster, name, 'echo "$(hostname) ${SSH_CONNECTION%% *}"')
        assert res.returncode == 0, f"{name}: {res.stderr}"
        host, client = res.stdout.split()
        assert host == name
        # the connection came from the last bastion's address on the node's
        # subnet (<subnet>.1: br1 in n1, eth1 in p1), not from the controller
        assert client == cluster.addr_of(name).rsplit(".", 1)[0] + ".1", (name, client)
        assert cluster.hostname_of(name) == name
    # the same through the controller's home config (the `cluster.ssh` helper)
    res = cluster.ssh(f"{prefix}-q1", "hostname")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{prefix}-q1"
    assert not cluster.wait_no_leftovers(timeout=10)


def test_private_subnets_fail_at_once_from_outside(cluster):
    """A direct connection to a private node fails locally and immediately:
    it never waits for a timeout, and no packet leaves the machine.

    From the controller (the root namespace, whose default route leads off
    the machine) that is the `unreachable` route for each private subnet: the
    kernel answers EHOSTUNREACH, "No route to host". From inside a node, which
    has no default route, it is ENETUNREACH, "Network is unreachable"."""
    for name in cluster.private_names:
        t0 = time.monotonic()
        with pytest.raises(OSError) as err:
            socket.create_connection((cluster.addr_of(name), 22), timeout=5).close()
        assert err.value.errno == errno.EHOSTUNREACH, (name, err.value)
        assert time.monotonic() - t0 < 1.0, name
    res = _state_ssh(cluster, "-o", "ProxyJump=none", cluster.private_names[0], "true")
    assert res.returncode == 255 and "No route to host" in res.stderr, res
    # nor from a public node that is not the bastion, nor from the bastion to
    # the second-level subnet
    code = (
        "import errno, socket, sys\n"
        "for addr in sys.argv[1:]:\n"
        "    try:\n"
        "        socket.create_connection((addr, 22), timeout=5).close()\n"
        "    except OSError as e:\n"
        "        assert e.errno == errno.ENETUNREACH, (addr, e)\n"
        "    else:\n"
        "        raise AssertionError(addr + ' is reachable')\n"
    )
    prefix = cluster.prefix
    checks = [(f"{prefix}-n1", [cluster.addr_of(f"{prefix}-q1")])]
    if len(cluster.names) > 1:
        checks.append((cluster.names[1], [cluster.addr_of(n) for n in cluster.private_names]))
    for node, addrs in checks:
        res = cluster.run_on(node, sys.executable, "-c", code, *addrs)
        assert res.returncode == 0, f"{node}: {res.stderr}"
    # and no namespace has a default route
    for name in cluster.all_names:
        for family in ("-4", "-6"):
            res = subprocess.run(["ip", "-n", name, family, "route", "show", "default"],
                                 capture_output=True, text=True, timeout=10, check=True)
            assert res.stdout.strip() == "", f"{name}: {res.stdout}"


def test_a_job_spans_both_private_subnets(cluster):
    """p1 forwards between its two subnets, so ranks on p1/p2 and on q1 can
    reach each other both ways (torch's rendezvous needs that)."""
    prefix = cluster.prefix
    p1, p2, q1 = (cluster.addr_of(f"{prefix}-{n}") for n in ("p1", "p2", "q1"))
    for node, addrs in ((f"{prefix}-q1", [p1, p2]), (f"{prefix}-p2", [q1]),
                        (f"{prefix}-p1", [q1, p2])):
        res = cluster.run_on(node, sys.executable, "-c", BANNER_CODE, *addrs)
        assert res.returncode == 0, f"{node}: {res.stderr}"
    # the same from an ssh session on q1
    res = cluster.ssh(f"{prefix}-q1", f"exec 3<>/dev/tcp/{p2}/22 && head -c 4 <&3")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "SSH-"


def test_bastion_listens_on_port_2222_too(cluster):
    n1 = cluster.names[0]
    with socket.create_connection((cluster.addr_of(n1), 2222), timeout=5) as s:
        assert s.recv(4).startswith(b"SSH-")
    for args in ([f"{n1}-2222"], ["-p", "2222", n1]):
        res = _state_ssh(cluster, *args, 'echo "$(hostname) ${SSH_CONNECTION##* }"')
        assert res.returncode == 0, f"{args}: {res.stderr}"
        assert res.stdout.split() == [n1, "2222"], args
    # the other nodes do not
    if len(cluster.names) > 1:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((cluster.addr_of(cluster.names[1]), 2222), timeout=5).close()


def test_ipv6_addresses_and_aliases(cluster):
    assert sorted(cluster.v6) == sorted(cluster.names)
    # ULA addresses in one /64, node i at ::(10+i) like its IPv4 .(10+i)
    for name, addr in cluster.nodes:
        v6 = ipaddress.IPv6Address(cluster.v6[name])
        assert v6 in ipaddress.IPv6Network("fc00::/7"), v6
        assert cluster.v6[name].endswith("::" + addr.rsplit(".", 1)[1])
    assert len({ipaddress.IPv6Interface(f"{a}/64").network for a in cluster.v6.values()}) == 1
    for name in (cluster.names[0], cluster.names[-1]):
        v6 = cluster.v6[name]
        with socket.create_connection((v6, 22), timeout=5) as s:
            assert s.recv(4).startswith(b"SSH-")
        for target in (f"{name}-v6", v6):
            res = _state_ssh(cluster, target, 'echo "$(hostname) $SSH_CONNECTION"')
            assert res.returncode == 0, f"{target}: {res.stderr}"
            host, _client, _cport, server, _sport = res.stdout.split()
            assert host == name
            assert ipaddress.ip_address(server) == ipaddress.ip_address(v6), target
    # the bastion's second port on IPv6 too
    res = _state_ssh(cluster, "-p", "2222", f"{cluster.names[0]}-v6", "hostname")
    assert res.returncode == 0, res.stderr


def test_user_certificate_logs_in(cluster):
    ssh_dir = cluster.home / ".ssh"
    key, cert = ssh_dir / "id_cert", ssh_dir / "usercert.pub"
    assert not (ssh_dir / "id_cert-cert.pub").exists()  # only CertificateFile finds it
    info = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True,
                          text=True, timeout=10, check=True).stdout
    assert "user certificate" in info
    principals = info.split("Principals:", 1)[1].split("Critical Options:", 1)[0].split()
    assert principals == ["root", f"{cluster.prefix}user"]
    n1 = cluster.names[0]
    base = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", f"UserKnownHostsFile={cluster.state / 'known_hosts'}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=10", "-i", str(key), f"root@{cluster.addr_of(n1)}"]
    # the key alone is not authorized anywhere ...
    res = _ssh(*base, "hostname")
    assert res.returncode == 255 and "Permission denied" in res.stderr, res
    # ... with its certificate it is
    res = _ssh("-o", f"CertificateFile={cert}", *base, "hostname")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == n1


def test_host_ca_alone_is_enough_to_trust_every_node(cluster, tmp_path):
    """A known_hosts holding only `@cert-authority * <host CA>` accepts every
    node, by name, IPv4 or IPv6 address, on another port, through bastions."""
    ca_line = (cluster.state / "known_hosts_ca").read_text()
    assert ca_line == "@cert-authority * " + (cluster.state / "host_ca.pub").read_text()
    assert (cluster.home / ".ssh" / "known_hosts_ca").read_text() == ca_line

    def config(known_hosts: Path) -> Path:
        # STATE/ssh_config with the known_hosts replaced (every Host block)
        text = (cluster.state / "ssh_config").read_text().replace(
            f"UserKnownHostsFile {cluster.state}/known_hosts\n",
            f"UserKnownHostsFile {known_hosts}\n    GlobalKnownHostsFile /dev/null\n")
        path = tmp_path / f"config-{known_hosts.name}"
        path.write_text(text)
        return path

    trusting = config(cluster.state / "known_hosts_ca")
    n1, prefix = cluster.names[0], cluster.prefix
    for target in ([n1], [f"{n1}-v6"], ["-p", "2222", n1], [f"{prefix}-q1"],
                   [cluster.v6[cluster.names[-1]]]):
        res = _ssh("-F", str(trusting), *target, "hostname")
        assert res.returncode == 0, f"{target}: {res.stderr}"
    # an unrelated CA is not: the node is refused
    other = tmp_path / "other_ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=True)
    wrong = tmp_path / "known_hosts_other"
    wrong.write_text("@cert-authority * " + (tmp_path / "other_ca.pub").read_text())
    res = _ssh("-F", str(config(wrong)), n1, "hostname")
    assert res.returncode == 255 and "Host key verification failed" in res.stderr, res


def test_sshd_settings_the_tests_rely_on(cluster):
    """Every node: forwarding allowed (nodes are bastions), MaxAuthTries at
    OpenSSH's default 6, the user CA trusted, the host certificate served."""
    for name in cluster.all_names:
        cfg = cluster.state / "nodes" / name / "sshd_config"
        res = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(cfg)],
                             capture_output=True, text=True, timeout=10)
        assert res.returncode == 0, f"{name}: {res.stderr}"
        settings = {}
        for line in res.stdout.splitlines():
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value)
        assert settings["allowtcpforwarding"] == ["yes"], name
        assert settings["maxauthtries"] == ["6"], name
        assert settings["trustedusercakeys"] == [str(cluster.state / "user_ca.pub")], name
        assert settings["hostcertificate"] == [
            str(cluster.state / "nodes" / name / "ssh_host_ed25519_key-cert.pub")], name
        want_ports = ["22", "2222"] if name == cluster.names[0] else ["22"]
        assert sorted(settings["port"]) == want_ports, name


def test_status_lists_every_node(cluster):
    res = subprocess.run([str(REPO / "scripts" / "testcluster"), "status", "--state", str(cluster.state)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()
            if line.startswith(f"{cluster.prefix}-")}
    assert sorted(rows) == sorted(cluster.all_names)
    for name in cluster.all_names:
        addr, via, state = rows[name][:3]
        assert addr == cluster.addr_of(name)
        assert state == "up", (name, rows[name])
    assert rows[f"{cluster.prefix}-q1"][1] == f"{cluster.prefix}-p1"
