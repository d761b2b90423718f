"""known_hosts as OpenSSH reads it: plain, hashed and [host]:port names, wildcards
and negation, @revoked and @cert-authority lines, and lines it cannot read.

Keys are real (ssh-keygen and paramiko), and hashed files are hashed by
`ssh-keygen -H`, so the hashing we check against is OpenSSH's own.
"""

from __future__ import annotations

import base64
import hmac
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from clusterrun.transports import knownhosts
from clusterrun.transports.knownhosts import HostKeyCheck, KnownHosts, Verdict, append_key, host_names

needs_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (openssh-client)")


class Key:
    def __init__(self, key_type: str, blob: bytes) -> None:
        self.type, self.blob = key_type, blob
        self.b64 = base64.b64encode(blob).decode()

    def line(self, hosts: str, marker: str = "") -> str:
        return f"{marker + ' ' if marker else ''}{hosts} {self.type} {self.b64} a comment"


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, Key]:
    """Two ECDSA keys, an RSA key and, where ssh-keygen is, two Ed25519 keys."""
    out = {}
    for name in ("ecdsa1", "ecdsa2"):
        k = paramiko.ECDSAKey.generate()
        out[name] = Key(k.get_name(), k.asbytes())
    rsa = paramiko.RSAKey.generate(1024)
    out["rsa"] = Key(rsa.get_name(), rsa.asbytes())
    if shutil.which("ssh-keygen"):
        d = tmp_path_factory.mktemp("keys")
        for name in ("ed1", "ed2"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
            key_type, b64 = (d / f"{name}.pub").read_text().split()[:2]
            out[name] = Key(key_type, base64.b64decode(b64))
    return out


def write(tmp_path: Path, *lines: str, name: str = "known_hosts") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def check(path: str, names, key: Key, key_type: str | None = None) -> HostKeyCheck:
    return KnownHosts.load([path]).check(names, key_type or key.type, key.blob)


def test_host_names_are_what_openssh_looks_up():
    assert host_names("node1", 22, None) == ("node1",)
    assert host_names("Node1.Example.COM", 22, None) == ("node1.example.com",)
    assert host_names("node1", 2222, None) == ("[node1]:2222",)
    assert host_names("fd00::5", 2222, None) == ("[fd00::5]:2222",)
    assert host_names("fd00::5", 22, None) == ("fd00::5",)
    # HostKeyAlias replaces the name, and OpenSSH adds no port to it
    assert host_names("10.0.0.5", 2222, "gpu-a") == ("gpu-a",)


def test_the_same_key_is_known_and_another_of_its_type_is_changed(tmp_path, keys):
    path = write(tmp_path, "# a comment", "", keys["ecdsa1"].line("node1,10.0.0.1"))
    assert check(path, ["node1"], keys["ecdsa1"]) == HostKeyCheck(Verdict.KNOWN, path, 3)
    assert check(path, ["10.0.0.1"], keys["ecdsa1"]).verdict is Verdict.KNOWN
    assert check(path, ["node1"], keys["ecdsa2"]) == HostKeyCheck(Verdict.CHANGED, path, 3)
    assert check(path, ["node2"], keys["ecdsa1"]) == HostKeyCheck(Verdict.UNKNOWN)


def test_any_line_with_the_key_wins_over_a_line_with_another_key(tmp_path, keys):
    path = write(tmp_path, keys["ecdsa2"].line("node1"), keys["ecdsa1"].line("node1"))
    assert check(path, ["node1"], keys["ecdsa1"]) == HostKeyCheck(Verdict.KNOWN, path, 2)


def test_only_other_key_types_known_is_unknown_and_known_types_lists_them(tmp_path, keys):
    path = write(tmp_path, keys["rsa"].line("node1"), keys["ecdsa1"].line("node1"),
                 keys["ecdsa2"].line("node1"), keys["rsa"].line("node2"))
    kh = KnownHosts.load([path])
    assert kh.known_types(["node1"]) == ["ssh-rsa", "ecdsa-sha2-nistp256"]
    assert kh.known_types(["node3"]) == []
    other = paramiko.ECDSAKey.generate(bits=384)
    assert kh.check(["node1"], other.get_name(), other.asbytes()).verdict is Verdict.UNKNOWN


def test_an_rsa_signature_algorithm_counts_as_ssh_rsa(tmp_path, keys):
    path = write(tmp_path, keys["rsa"].line("node1"))
    other = paramiko.RSAKey.generate(1024)
    assert check(path, ["node1"], keys["rsa"], "rsa-sha2-512").verdict is Verdict.KNOWN
    assert KnownHosts.load([path]).check(["node1"], "rsa-sha2-256", other.asbytes()).verdict is Verdict.CHANGED


def test_bracketed_port_names_match_only_that_port(tmp_path, keys):
    path = write(tmp_path, keys["ecdsa1"].line("[node1]:2222"))
    assert check(path, host_names("node1", 2222, None), keys["ecdsa1"]).verdict is Verdict.KNOWN
    assert check(path, host_names("node1", 22, None), keys["ecdsa1"]).verdict is Verdict.UNKNOWN
    assert check(path, host_names("node1", 2200, None), keys["ecdsa1"]).verdict is Verdict.UNKNOWN


def test_wildcards_and_negation(tmp_path, keys):
    path = write(tmp_path, keys["ecdsa1"].line("*.example.com,!bad.example.com"),
                 keys["ecdsa1"].line("gpu?"), keys["ecdsa1"].line("[10.0.0.*]:2222"))
    for name in ("a.example.com", "GOOD.example.com", "gpu1", "[10.0.0.7]:2222"):
        assert check(path, [name], keys["ecdsa1"]).verdict is Verdict.KNOWN, name
    # a matching negated pattern vetoes the line; ? is one character
    for name in ("bad.example.com", "example.com", "gpu10", "gpu", "[10.0.0.7]:22"):
        assert check(path, [name], keys["ecdsa1"]).verdict is Verdict.UNKNOWN, name


def test_brackets_are_literal_not_character_classes(tmp_path, keys):
    path = write(tmp_path, keys["ecdsa1"].line("[ab]"))
    assert check(path, ["a"], keys["ecdsa1"]).verdict is Verdict.UNKNOWN
    assert check(path, ["[ab]"], keys["ecdsa1"]).verdict is Verdict.KNOWN


@needs_keygen
def test_hashed_names_as_ssh_keygen_hashes_them(tmp_path, keys):
    path = write(tmp_path, keys["ed1"].line("node1"), keys["ed1"].line("[node2]:2222"),
                 keys["ecdsa1"].line("node3,10.0.0.3"))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", path], check=True, capture_output=True)
    text = Path(path).read_text()
    assert "node1" not in text and text.count("|1|") == 4     # one hashed line per name
    assert check(path, ["node1"], keys["ed1"]).verdict is Verdict.KNOWN
    assert check(path, ["NODE1"], keys["ed1"]).verdict is Verdict.KNOWN
    assert check(path, host_names("node2", 2222, None), keys["ed1"]).verdict is Verdict.KNOWN
    assert check(path, ["node2"], keys["ed1"]).verdict is Verdict.UNKNOWN
    assert check(path, ["10.0.0.3"], keys["ecdsa1"]).verdict is Verdict.KNOWN
    assert check(path, ["node1"], keys["ed2"]).verdict is Verdict.CHANGED
    assert check(path, ["node4"], keys["ed1"]).verdict is Verdict.UNKNOWN


@needs_keygen
def test_revoked_wins_over_everything_but_only_for_its_key_and_hosts(tmp_path, keys):
    path = write(tmp_path, keys["ed1"].line("node1,node2"), keys["ed2"].line("node1"),
                 keys["ed1"].line("node1", "@revoked"),
                 keys["ed1"].line("*.example.com", "@cert-authority"))
    assert check(path, ["node1"], keys["ed1"]) == HostKeyCheck(Verdict.REVOKED, path, 3)
    assert check(path, ["node1"], keys["ed2"]).verdict is Verdict.KNOWN
    assert check(path, ["node2"], keys["ed1"]).verdict is Verdict.KNOWN     # not revoked for node2
    wild = write(tmp_path, keys["ed1"].line("*", "@revoked"), keys["ed1"].line("node1"), name="wild")
    assert check(wild, ["anything"], keys["ed1"]).verdict is Verdict.REVOKED
    assert check(wild, ["node1"], keys["ed1"]).verdict is Verdict.REVOKED


@needs_keygen
def test_revoked_hashed_line(tmp_path, keys):
    path = write(tmp_path, keys["ed1"].line("node1"))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", path], check=True, capture_output=True)
    hashed_name = Path(path).read_text().split()[0]
    with open(path, "a") as f:
        f.write(keys["ed1"].line(hashed_name, "@revoked") + "\n")
    assert check(path, ["node1"], keys["ed1"]) == HostKeyCheck(Verdict.REVOKED, path, 2)


@needs_keygen
def test_cert_authority_lines_speak_only_when_no_plain_line_decides(tmp_path, keys):
    path = write(tmp_path, keys["ed1"].line("*.example.com,!skip.example.com", "@cert-authority"),
                 keys["ecdsa1"].line("known.example.com"), keys["ed2"].line("ed.example.com"))
    assert check(path, ["gpu.example.com"], keys["ed2"]) == HostKeyCheck(Verdict.CA_ONLY, path, 1)
    assert check(path, ["known.example.com"], keys["ecdsa1"]) == HostKeyCheck(Verdict.KNOWN, path, 2)
    assert check(path, ["known.example.com"], keys["ecdsa2"]) == HostKeyCheck(Verdict.CHANGED, path, 2)
    # another key type known for the host decides nothing: the CA still speaks
    assert check(path, ["known.example.com"], keys["ed2"]).verdict is Verdict.CA_ONLY
    assert check(path, ["ed.example.com"], keys["ed1"]).verdict is Verdict.CHANGED
    assert check(path, ["skip.example.com"], keys["ed1"]).verdict is Verdict.UNKNOWN
    assert check(path, ["node1"], keys["ed1"]).verdict is Verdict.UNKNOWN   # unrelated: no trouble
    assert KnownHosts.load([path]).known_types(["gpu.example.com"]) == []   # CA lines are not host keys


def test_lines_openssh_cannot_read_are_skipped(tmp_path, keys):
    k = keys["ecdsa1"]
    path = write(
        tmp_path,
        "garbage",
        "node1 ssh-ed25519",                                  # no key
        f"node1 {k.type} !!!notbase64!!!",
        f"node1 ssh-ed25519 {k.b64}",                         # the blob says ecdsa
        f"@bogus node1 {k.type} {k.b64}",                     # unknown marker
        f"@revoked node1 {k.type}",
        f"|1|bad|hash {k.type} {k.b64}",
        "1024 35 12345678901234567890 node1",                 # an SSH1 key
        "\xff\xfe binary junk",
        k.line("node1"),
    )
    kh = KnownHosts.load([path])
    assert len(kh.entries) == 1
    assert kh.check(["node1"], k.type, k.blob) == HostKeyCheck(Verdict.KNOWN, path, 10)


def test_load_reads_every_file_in_order_and_skips_missing_ones(tmp_path, keys):
    first = write(tmp_path, keys["ecdsa1"].line("node1"), name="a")
    second = write(tmp_path, keys["ecdsa2"].line("node1"), keys["rsa"].line("node2"), name="b")
    kh = KnownHosts.load([str(tmp_path / "missing"), first, str(tmp_path / "nodir" / "x"), second])
    assert kh.check(["node1"], keys["ecdsa2"].type, keys["ecdsa2"].blob) == HostKeyCheck(Verdict.KNOWN, second, 1)
    assert kh.check(["node2"], keys["rsa"].type, keys["rsa"].blob) == HostKeyCheck(Verdict.KNOWN, second, 2)
    assert KnownHosts.load([str(tmp_path / "missing")]).entries == []


def test_an_unreadable_file_raises_oserror(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        KnownHosts.load([str(tmp_path / "dir")])


def test_load_is_cached_until_a_file_changes(tmp_path, keys, monkeypatch):
    path = write(tmp_path, keys["ecdsa1"].line("node1"))
    parsed = []
    real = knownhosts._parse_file
    monkeypatch.setattr(knownhosts, "_parse_file", lambda p: parsed.append(p) or real(p))
    kh = KnownHosts.load([path])
    assert KnownHosts.load([path]) is kh and parsed == [path]
    append_key(path, "node2", keys["ecdsa2"].type, keys["ecdsa2"].blob)
    again = KnownHosts.load([path])
    assert again is not kh and parsed == [path, path]
    assert again.check(["node2"], keys["ecdsa2"].type, keys["ecdsa2"].blob).verdict is Verdict.KNOWN
    # a file shared by two lists of files is parsed once
    KnownHosts.load([str(tmp_path / "missing"), path])
    assert parsed == [path, path]


def test_many_threads_loading_at_once_parse_each_file_once(tmp_path, keys, monkeypatch):
    path = write(tmp_path, *(keys["ecdsa1"].line(f"node{i}") for i in range(500)))
    parsed = []
    real = knownhosts._parse_file

    def slow_parse(p: str):
        parsed.append(p)
        time.sleep(0.05)
        return real(p)

    monkeypatch.setattr(knownhosts, "_parse_file", slow_parse)
    results = []
    threads = [threading.Thread(target=lambda: results.append(KnownHosts.load([path]))) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert parsed == [path] and len({id(r) for r in results}) == 1


def test_append_key_makes_a_private_directory_and_keeps_lines_whole(tmp_path, keys):
    path = tmp_path / "new" / ".ssh" / "known_hosts"
    append_key(str(path), "[node1]:2222", keys["ecdsa1"].type, keys["ecdsa1"].blob)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.read_text() == f"[node1]:2222 {keys['ecdsa1'].type} {keys['ecdsa1'].b64}\n"
    # a file whose last line has no newline keeps that line intact
    old = tmp_path / "old"
    old.write_text(keys["rsa"].line("node0"))
    append_key(str(old), "node1", keys["ecdsa1"].type, keys["ecdsa1"].blob)
    kh = KnownHosts.load([str(old)])
    assert kh.check(["node0"], keys["rsa"].type, keys["rsa"].blob).verdict is Verdict.KNOWN
    assert kh.check(["node1"], keys["ecdsa1"].type, keys["ecdsa1"].blob) == HostKeyCheck(Verdict.KNOWN, str(old), 2)


def test_big_files_with_many_nodes_find_every_key(tmp_path, keys):
    """32 nodes against 6000 lines, a third hashed, some wildcards: each is found (how fast is
    scripts/bench's business, not a test's)."""
    k = keys["ecdsa1"]
    lines = [k.line(f"host{i}.example.com,10.1.{i // 256}.{i % 256}") for i in range(4000)]
    salt = os.urandom(20)
    for i in range(2000):
        digest = hmac.digest(salt, f"hashed{i}".encode(), "sha1")
        lines.append(k.line(f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"))
    lines += [k.line("*.wild.example.com"), k.line("[gpu*]:2222,!gpu0")]
    path = write(tmp_path, *lines)
    kh = KnownHosts.load([path])
    verdicts = [kh.check(host_names(f"host{i}.example.com", 22, None), k.type, k.blob).verdict for i in range(16)]
    verdicts += [kh.check([f"hashed{i}"], k.type, k.blob).verdict for i in range(16)]
    assert set(verdicts) == {Verdict.KNOWN}
    assert kh.check(["[gpu7]:2222"], k.type, k.blob).verdict is Verdict.KNOWN
