"""Unit: the identities the paramiko transport offers, in OpenSSH's order, with a real ssh-agent.

OpenSSH (sshconnect2.c pubkey_prepare) offers CertificateFile certificates first,
then the agent's keys (only those an IdentityFile names, under IdentitiesOnly),
then the key files the agent does not hold.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from clusterrun.paramikossh import identities
from clusterrun.sshconfig import SSHTarget


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True)
    return path


def blob(pub: Path) -> bytes:
    import base64
    return base64.b64decode(pub.read_text().split()[1])


@pytest.fixture
def agent(tmp_path):
    sock = tmp_path / "agent.sock"
    out = subprocess.run(["ssh-agent", "-a", str(sock)], capture_output=True, text=True, check=True).stdout
    pid = int(re.search(r"SSH_AGENT_PID=(\d+)", out).group(1))

    def add(key: Path) -> None:
        subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True, capture_output=True)

    yield sock, add
    os.kill(pid, 15)


def target(**kw) -> SSHTarget:
    base = dict(target="n", hostname="10.0.0.1", port=22, user="u", identity_files=(),
                certificate_files=(), identities_only=False, identity_agent="", user_known_hosts=(),
                global_known_hosts=(), strict_host_key_checking="yes", host_key_alias=None,
                connect_timeout=None, proxy_command=None, proxy_jump=(), address_family="any",
                source="ssh -G")
    return SSHTarget(**{**base, **kw})


def test_identities_only_offers_just_the_agent_key_an_identity_file_names(tmp_path, agent):
    sock, add = agent
    keys = [keygen(tmp_path / f"k{i}") for i in range(4)]
    for k in keys:
        add(k)
    pub_only = tmp_path / "pub" / "chosen.pub"            # no private file beside it
    pub_only.parent.mkdir()
    pub_only.write_text((tmp_path / "k2.pub").read_text())
    offered, _ = identities(target(identity_agent=str(sock), identities_only=True,
                                   identity_files=(str(pub_only),)))
    assert [k.asbytes() for k in offered] == [blob(tmp_path / "k2.pub")]


def test_without_identities_only_agent_keys_come_before_key_files(tmp_path, agent):
    sock, add = agent
    a, b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    add(a)
    offered, _ = identities(target(identity_agent=str(sock), identity_files=(str(b), str(a))))
    # a is in the agent: offered from there, once; b from its file, after the agent's keys
    assert [k.asbytes() for k in offered] == [blob(tmp_path / "a.pub"), blob(tmp_path / "b.pub")]


def test_a_certificate_file_comes_first_with_its_private_half_from_the_agent(tmp_path, agent):
    sock, add = agent
    ca, key = keygen(tmp_path / "ca"), keygen(tmp_path / "key")
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "t", "-n", "u", str(key) + ".pub"], check=True)
    cert = tmp_path / "some-other-name.pub"
    (tmp_path / "key-cert.pub").rename(cert)
    add(key)
    os.unlink(key)                                       # the private half is in the agent only
    offered, notes = identities(target(identity_agent=str(sock), identities_only=True,
                                       identity_files=(str(key) + ".pub",),
                                       certificate_files=(str(cert),)))
    assert offered[0].public_blob is not None and offered[0].public_blob.key_type.endswith("-cert-v01@openssh.com")
    assert [k.asbytes() for k in offered[1:]] == [blob(Path(str(key) + ".pub"))]
    assert notes == []


def test_identity_agent_none_uses_no_agent_and_a_passphrase_key_is_named(tmp_path, agent, monkeypatch):
    sock, add = agent
    a = keygen(tmp_path / "a")
    add(a)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    offered, notes = identities(target(identity_agent="", identity_files=(str(locked),)))
    assert offered == []
    assert any("passphrase" in n and str(locked) in n for n in notes)
    offered, _ = identities(target(identity_agent=None))   # None: $SSH_AUTH_SOCK
    assert [k.asbytes() for k in offered] == [blob(tmp_path / "a.pub")]
