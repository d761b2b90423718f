"""Unit: the identities the paramiko transport offers, in OpenSSH's order, with a real ssh-agent;
and a session's stderr, over a real paramiko connection to an in-process server.

OpenSSH (sshconnect2.c pubkey_prepare) offers CertificateFile certificates first,
then the agent's keys (only those an IdentityFile names, under IdentitiesOnly),
then the key files the agent does not hold.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import paramiko
import pytest

from clusterrun.transports.paramiko import STDERR_TAIL, SSHTransport, _Conn, identities
from clusterrun.transports.sshconfig import SSHTarget


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


# --- a session's stderr, over a real paramiko connection to an in-process server ------------

class _Server(paramiko.ServerInterface):
    """Accepts anyone, and runs each exec's command as `commands[command](channel)`."""

    def __init__(self, commands: dict[str, Callable[[paramiko.Channel], None]]) -> None:
        self.commands = commands

    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        run = self.commands[command.decode()]
        threading.Thread(target=run, args=(channel,), daemon=True).start()
        return True


@pytest.fixture
def node():
    """exec(command) on an SSHTransport to a paramiko server whose commands the test defines."""
    ours, theirs = socket.socketpair()
    commands: dict[str, Callable[[paramiko.Channel], None]] = {}
    server = paramiko.Transport(theirs)
    server.add_server_key(paramiko.ECDSAKey.generate())
    server.start_server(threading.Event(), _Server(commands))    # (an event: it negotiates in the background)
    client = paramiko.Transport(ours)
    client.start_client(timeout=10)
    client.auth_none("u")
    yield commands, SSHTransport("n", _Conn(client, "u@n:22", lambda: None), "127.0.0.1")
    client.close()
    server.close()


def _exit(chan: paramiko.Channel, code: int) -> None:
    """End the command, once the client has closed its stdin (a close before the
    server's reply to the exec would fail the exec)."""
    chan.settimeout(10)
    while chan.recv(1024):
        pass
    chan.send_exit_status(code)
    chan.close()


def _stderr_readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stderr of ")]


def test_three_megabytes_on_stderr_do_not_stall_stdout(node):
    """stdout and stderr share the channel's 2 MB window: stderr left unread would fill it."""
    commands, t = node

    def noisy(chan: paramiko.Channel) -> None:
        chan.sendall_stderr(b"w" * 3_000_000 + "last words é\n".encode())
        chan.sendall(b"AGENT READY\n")
        _exit(chan, 3)

    commands["noisy"] = noisy
    proc = t.exec("noisy")
    proc.close_stdin()
    proc.set_read_timeout(20)                  # before the fix: socket.timeout here
    try:
        assert proc.stdout.readline() == b"AGENT READY\n"
        assert proc.wait(10) == 3
        err = proc.stderr_text()
    finally:
        proc.close()
    assert err.endswith("wwwlast words é\n")  # the tail, whole
    assert len(err.encode()) <= STDERR_TAIL


def test_each_session_s_stderr_reader_ends_with_it(node):
    """No thread left per session: at the command's end, and at a close while it runs."""
    commands, t = node
    release = threading.Event()

    def quick(chan: paramiko.Channel) -> None:
        chan.sendall_stderr(b"a warning\n")
        _exit(chan, 0)

    def endless(chan: paramiko.Channel) -> None:
        release.wait(30)

    commands.update(quick=quick, endless=endless)
    before = len(_stderr_readers())
    for _ in range(5):
        proc = t.exec("quick")
        proc.close_stdin()
        assert proc.wait(10) == 0
        assert proc.stderr_text() == "a warning\n"
        proc.close()
    running = t.exec("endless")
    assert len(_stderr_readers()) >= before + 1
    running.close()                            # while the command still runs
    deadline = time.monotonic() + 10
    while len(_stderr_readers()) > before and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    assert len(_stderr_readers()) == before


def test_merged_stderr_has_no_reader_of_its_own(node):
    commands, t = node

    def both(chan: paramiko.Channel) -> None:
        chan.sendall_stderr(b"e" * 3_000_000)
        chan.sendall(b"done\n")
        _exit(chan, 0)

    commands["both"] = both
    before = len(_stderr_readers())
    proc = t.exec("both", merge_stderr=True)
    proc.close_stdin()
    proc.set_read_timeout(20)
    try:
        assert len(_stderr_readers()) == before
        assert proc.stdout.read() == b"e" * 3_000_000 + b"done\n"
        assert proc.stderr_text() == ""
    finally:
        proc.close()
