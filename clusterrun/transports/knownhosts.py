"""known_hosts files as OpenSSH reads them.

paramiko.HostKeys drops or chokes on what real files hold: `@cert-authority`
and `@revoked` markers, wildcard and negated patterns. This reader follows
OpenSSH's hostfile.c instead: each line is `[@marker] patterns keytype base64
[comment]`; patterns are a comma list with `*`/`?` wildcards and `!` negation,
or one hashed name `|1|base64(salt)|base64(HMAC-SHA1(salt, name))`; a host on a
port other than 22 is written `[host]:port`. Lines it cannot read are skipped,
as OpenSSH skips them.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Sequence


class Verdict(enum.Enum):
    KNOWN = "known"          # a line holds exactly this key
    UNKNOWN = "unknown"      # nothing recorded for this host and key type
    CHANGED = "changed"      # another key of the same type is recorded: refuse
    REVOKED = "revoked"      # an @revoked line names this key: refuse, always
    CA_ONLY = "ca-only"      # only @cert-authority lines speak for this host


@dataclass(frozen=True)
class HostKeyCheck:
    verdict: Verdict
    path: str | None = None          # file and line that decided it (for messages)
    line: int | None = None


def host_names(hostname: str, port: int, alias: str | None) -> tuple[str, ...]:
    """The names OpenSSH looks up: HostKeyAlias as it is, else `host` or `[host]:port`."""
    if alias:
        return (alias.lower(),)     # OpenSSH appends no port to an alias
    name = hostname.lower()
    return (name,) if port in (22, 0) else (f"[{name}]:{port}",)


def match_pattern(name: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: `*` any run, `?` one character, all else literal."""
    if "*" not in pattern and "?" not in pattern:
        return name == pattern
    return _wildcard_re(pattern).fullmatch(name) is not None


def match_pattern_list(name: str, patterns: Sequence[str]) -> bool | None:
    """OpenSSH's match_pattern_list: True on a match, False when a negated
    pattern matches (which vetoes the whole list), None when nothing matches."""
    matched: bool | None = None
    for p in patterns:
        if p.startswith("!"):
            if match_pattern(name, p[1:]):
                return False
        elif matched is None and match_pattern(name, p):
            matched = True
    return matched


_wildcard_cache: dict[str, re.Pattern[str]] = {}


def _wildcard_re(pattern: str) -> re.Pattern[str]:
    rx = _wildcard_cache.get(pattern)
    if rx is None:
        rx = re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."), re.DOTALL)
        _wildcard_cache[pattern] = rx
    return rx


# OpenSSH records an RSA key as ssh-rsa whichever signature algorithm was negotiated.
_SAME_TYPE = {"rsa-sha2-256": "ssh-rsa", "rsa-sha2-512": "ssh-rsa"}


def _base_type(key_type: str) -> str:
    return _SAME_TYPE.get(key_type, key_type)


@dataclass(frozen=True)
class _Entry:
    path: str
    line: int
    marker: str                      # "" | "revoked" | "cert-authority"
    patterns: tuple[str, ...]        # lowercased; empty for a hashed entry
    hashed: tuple[bytes, bytes] | None   # (salt, digest)
    key_type: str
    blob: bytes


def _parse_line(path: str, number: int, text: str) -> _Entry | None:
    """One line as an entry, or None for blanks, comments and anything malformed."""
    fields = text.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = ""
    if fields[0].startswith("@"):
        marker = fields.pop(0)[1:]
        if marker not in ("revoked", "cert-authority"):
            return None
    if len(fields) < 3:
        return None
    hosts, key_type, b64 = fields[0], fields[1], fields[2]
    try:
        blob = base64.b64decode(b64, validate=True)
        # the blob names its own type; a mismatch is a line OpenSSH cannot load
        (n,) = struct.unpack(">I", blob[:4])
        if blob[4:4 + n].decode("ascii") != key_type:
            return None
        hashed = None
        patterns: tuple[str, ...] = ()
        if hosts.startswith("|1|"):
            salt, digest = hosts[3:].split("|")
            hashed = (base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True))
            if len(hashed[1]) != 20:
                return None
        else:
            patterns = tuple(hosts.lower().split(","))
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        return None
    return _Entry(path, number, marker, patterns, hashed, key_type, blob)


def _parse_file(path: str) -> list[_Entry]:
    with open(path, "rb") as f:
        data = f.read()
    entries = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        entry = _parse_line(path, number, raw)
        if entry is not None:
            entries.append(entry)
    return entries


@dataclass
class KnownHosts:
    """The entries of some known_hosts files, in file order, indexed by name."""

    entries: list[_Entry]
    # Most lines name literal hosts: look those up in a dict. Only hashed,
    # wildcard and negated lines need testing against each name, and each
    # name's answer is kept (many nodes share one bastion's name).
    _literal: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _hashed: list[tuple[int, bytes, bytes]] = field(default_factory=list, repr=False)
    _wild: list[int] = field(default_factory=list, repr=False)
    _by_name: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, e in enumerate(self.entries):
            if e.hashed is not None:
                self._hashed.append((i, *e.hashed))
            elif any(c in p for p in e.patterns for c in "*?!"):
                self._wild.append(i)
            else:
                for p in dict.fromkeys(e.patterns):
                    self._literal.setdefault(p, []).append(i)

    @classmethod
    def load(cls, paths: Sequence[str]) -> KnownHosts:
        """These files' entries; missing files are skipped, unreadable ones raise OSError.

        Cached per list of files and each file's mtime and size, so that
        threads connecting to 32 nodes parse each file once, and a file that
        changed (accept-new appended to it) is read again.
        """
        stamps = tuple((p, _stamp(p)) for p in paths)
        with _lock:
            known = _cache.get(stamps)
            if known is None:
                entries: list[_Entry] = []
                for path, stamp in stamps:
                    if stamp is None:
                        continue
                    parsed = _file_cache.get((path, stamp))
                    if parsed is None:
                        for stale in [k for k in _file_cache if k[0] == path]:
                            del _file_cache[stale]
                        parsed = _file_cache[(path, stamp)] = _parse_file(path)
                    entries.extend(parsed)
                # forget what these paths held before they changed
                for old in [k for k in _cache if [p for p, _ in k] == list(paths)]:
                    del _cache[old]
                known = _cache[stamps] = cls(entries)
            return known

    def _matching(self, names: Sequence[str]) -> list[_Entry]:
        found: set[int] = set()
        for name in names:
            name = name.lower()
            hits = self._by_name.get(name)
            if hits is None:            # two threads may both compute it: same answer
                raw = name.encode()
                hashed = [i for i, salt, digest in self._hashed if hmac.digest(salt, raw, "sha1") == digest]
                wild = [i for i in self._wild if match_pattern_list(name, self.entries[i].patterns)]
                hits = self._by_name[name] = (*self._literal.get(name, ()), *hashed, *wild)
            found.update(hits)
        return [self.entries[i] for i in sorted(found)]

    def check(self, names: Sequence[str], key_type: str, key_blob: bytes) -> HostKeyCheck:
        """What these files say about this host presenting this key."""
        key_type = _base_type(key_type)
        known = changed = ca = None
        for e in self._matching(names):
            if e.marker == "revoked":
                if e.blob == key_blob:
                    return HostKeyCheck(Verdict.REVOKED, e.path, e.line)
            elif e.marker == "cert-authority":
                ca = ca or e
            elif e.blob == key_blob:
                known = known or e
            elif e.key_type == key_type:
                changed = changed or e
        # A plain line decides; only then do CA lines speak. Other key types
        # alone leave the key UNKNOWN (see known_types).
        for verdict, found in ((Verdict.KNOWN, known), (Verdict.CHANGED, changed), (Verdict.CA_ONLY, ca)):
            if found is not None:
                return HostKeyCheck(verdict, found.path, found.line)
        return HostKeyCheck(Verdict.UNKNOWN)

    def known_types(self, names: Sequence[str]) -> list[str]:
        """Key types recorded for these names on plain lines, first seen first."""
        return list(dict.fromkeys(e.key_type for e in self._matching(names) if not e.marker))


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_mtime_ns, st.st_size


_lock = threading.Lock()
_cache: dict[tuple[tuple[str, tuple[int, int] | None], ...], KnownHosts] = {}
_file_cache: dict[tuple[str, tuple[int, int]], list[_Entry]] = {}


def append_key(path: str, name: str, key_type: str, key_blob: bytes) -> None:
    """Record a host key as accept-new does (the directory made 0700 if missing)."""
    line = f"{name} {key_type} {base64.b64encode(key_blob).decode()}\n".encode()
    with _lock:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        with open(path, "a+b") as f:
            # a last line without its newline would swallow ours
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
