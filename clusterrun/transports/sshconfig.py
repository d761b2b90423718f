"""What OpenSSH means by an ssh target.

A host in the hosts file is an ssh target, and the user's whole ssh
configuration applies to it (Include, Match, tokens, the system-wide file,
every default). Nobody knows that configuration as well as OpenSSH, so where
the controller has an `ssh` client we ask it: `ssh -G TARGET` prints the
configuration it would use and connects to nothing. Only without a client do we
read the files ourselves, with a parser that follows OpenSSH's readconf.c for
what clusterrun uses (Host, Match, Include, first value wins).
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import UnreachableError
from .knownhosts import match_pattern, match_pattern_list
from ..parallel import each

SYSTEM_CONFIG = "/etc/ssh/ssh_config"
DEFAULT_IDENTITY_FILES = (
    "~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk", "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk", "~/.ssh/id_xmss", "~/.ssh/id_dsa",
)
DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"
DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"
SSH_G_TIMEOUT = 30.0        # a `Match exec` may run anything; don't hang on one
MAX_INCLUDE_DEPTH = 16      # OpenSSH's READCONF_MAX_DEPTH


@dataclass(frozen=True)
class Hop:
    """One ProxyJump entry: "host", "user@host:port", "ssh://user@host:port", "[v6]:port"."""

    host: str
    user: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class SSHTarget:
    """One ssh target as OpenSSH resolves it, the hosts file's overrides applied."""

    target: str                      # as given (alias, maybe user@alias)
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]  # ~ expanded, in OpenSSH's order (may not exist: callers skip)
    certificate_files: tuple[str, ...]
    identities_only: bool
    identity_agent: str | None       # a socket path; None: $SSH_AUTH_SOCK; "": no agent (IdentityAgent none)
    user_known_hosts: tuple[str, ...]
    global_known_hosts: tuple[str, ...]
    strict_host_key_checking: str    # "yes" | "accept-new" | "no"
    host_key_alias: str | None
    connect_timeout: float | None
    proxy_command: str | None        # %h %p %r %n %% expanded; None if none
    proxy_jump: tuple[Hop, ...]      # () if none (ProxyJump none, or ProxyCommand came first)
    address_family: str              # "any" | "inet" | "inet6"
    source: str                      # "ssh -G" or "parser" (the fallback)
    send_env: tuple[str, ...] = ()   # SendEnv patterns (`*`, `?`): local variables to pass on
    set_env: tuple[tuple[str, str], ...] = ()    # SetEnv NAME=VALUE pairs, in order

    def session_env(self, environ: Mapping[str, str]) -> list[tuple[str, str]]:
        """The variables ssh asks the server to set in each session, in its order: those of
        `environ` that a SendEnv pattern names, then SetEnv's (sshd takes them only where
        its AcceptEnv allows, and keeps the last value of a name)."""
        sent = [(k, v) for k, v in environ.items() if any(match_pattern(k, p) for p in self.send_env)]
        return sent + list(self.set_env)


class _ConfigError(Exception):
    """Something wrong with the user's configuration; resolve() names the node."""


# --- ProxyJump ---------------------------------------------------------------

def parse_jump(spec: str) -> tuple[Hop, ...]:
    """A ProxyJump value as hops, first hop first; "none" is no hop.

    Raises ValueError saying which entry is wrong and why.
    """
    spec = spec.strip()
    if spec.lower() == "none":
        return ()
    return tuple(_parse_hop(entry) for entry in spec.split(","))


def _parse_hop(entry: str) -> Hop:
    rest = entry.strip()
    uri = rest.lower().startswith("ssh://")
    if uri:
        # ssh://[user[;params]@]host[:port][/]
        rest = rest[6:].removesuffix("/")
    user, at, rest = rest.rpartition("@")     # OpenSSH splits at the last @
    if uri:
        user = user.split(";", 1)[0]
    port_text: str | None = None
    if rest.startswith("["):                  # [v6] or [v6]:port
        host, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(f"bad jump host {entry!r}: unbalanced [ ]")
        if after:
            port_text = after[1:]
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:                                     # a name, or a bare IPv6 address
        host = rest
    if not host or (at and not user):
        raise ValueError(f"bad jump host {entry!r}: expected [user@]host[:port] or ssh://[user@]host[:port]")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad jump host {entry!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return Hop(host=host, user=user or None, port=port)


# --- resolving ------------------------------------------------------------------

def resolve(target: str, *, user: str | None = None, port: int | None = None,
            identity_file: str | None = None, node: str | None = None) -> SSHTarget:
    """What `ssh TARGET` would use, with the hosts file's user/port/identity_file winning.

    Raises UnreachableError, naming `node` (else the target), when the
    configuration is one OpenSSH rejects.
    """
    try:
        return _resolve((target, user, port, identity_file))
    except _ConfigError as e:
        raise UnreachableError(f"{node or target}: {e}") from None


def resolve_many(requests: Sequence[tuple[str, str | None, int | None, str | None]],
                 node_names: Sequence[str]) -> list[SSHTarget | UnreachableError]:
    """resolve() for many nodes: each distinct (target, user, port, identity_file)
    once, all of them in parallel (each `ssh -G` is a process of ~10 ms), the
    answer per request. Errors come back, not raised, each naming
    its own node."""
    if len(requests) != len(node_names):
        raise ValueError("one node name per request")
    distinct = list(dict.fromkeys(requests))

    answers = dict(zip(distinct, each(distinct, _resolve, window=32)))
    results: list[SSHTarget | UnreachableError] = []
    for request, node in zip(requests, node_names):
        answer = answers[request]
        if answer.error is None:
            results.append(answer.value)  # type: ignore[arg-type]
        elif isinstance(answer.error, _ConfigError):
            results.append(UnreachableError(f"{node}: {answer.error}"))
        else:
            raise answer.error
    return results


def _resolve(request: tuple[str, str | None, int | None, str | None]) -> SSHTarget:
    target, user, port, identity_file = request
    if identity_file:
        identity_file = os.path.expanduser(identity_file)
    ssh = shutil.which("ssh")
    if ssh:
        options, source = _ssh_g(ssh, target, user, port, identity_file), "ssh -G"
    else:
        options, source = _parse_config(target, user, port, identity_file), "parser"
    return _target(target, options, source, identity_file)


def _ssh_g(ssh: str, target: str, user: str | None, port: int | None,
           identity_file: str | None) -> dict[str, list[str]]:
    """`ssh -G` output: keyword -> values (IdentityFile and CertificateFile repeat)."""
    argv = [ssh, "-G"]
    if user:
        argv += ["-l", user]
    if port:
        argv += ["-p", str(port)]
    if identity_file:
        argv += ["-i", identity_file]
    try:
        done = subprocess.run(argv + ["--", target], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=SSH_G_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise _ConfigError(f"`ssh -G {target}` did not finish in {SSH_G_TIMEOUT:g}s "
                           "(a `Match exec` command in your ssh config?)") from None
    except OSError as e:
        raise _ConfigError(f"cannot run {ssh}: {e.strerror or e}") from None
    if done.returncode != 0:
        # ssh's own words, one line: reports list one line per node
        words = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        raise _ConfigError(f"ssh -G rejects your ssh configuration: {words or f'exit {done.returncode}'}")
    options: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key.lower(), []).append(value)
    return options


def _target(target: str, o: dict[str, list[str]], source: str, identity_file: str | None) -> SSHTarget:
    """SSHTarget from `ssh -G`-style options (the fallback parser emulates them)."""
    def one(key: str, default: str | None = None) -> str | None:
        values = o.get(key)
        return values[0] if values else default

    try:
        port = int(one("port", "22"))  # type: ignore[arg-type]
    except ValueError:
        raise _ConfigError(f"bad Port {one('port')!r}") from None
    original = one("host") or target
    tokens = _tokens(original, one("hostname") or original, port, one("user") or _local_user(),
                     one("hostkeyalias"))
    # ssh -G prints these two unexpanded (it expands them when it loads the keys)
    identities = [_expand_path(p, tokens, "IdentityFile") for p in o.get("identityfile", [])]
    if identity_file and identity_file not in identities:
        # ssh -G leaves out a file that isn't there (and warns); keep it so
        # callers can say so, ahead of the rest as with `ssh -i`
        identities.insert(0, identity_file)
    certificates = [_expand_path(p, tokens, "CertificateFile") for p in o.get("certificatefile", [])]

    agent = one("identityagent")
    if agent == "none":
        agent = ""
    elif agent == "SSH_AUTH_SOCK":
        agent = None
    elif agent is not None and agent.startswith("$"):   # $VAR names the socket's variable
        agent = os.environ.get(agent[1:], "")

    strict = (one("stricthostkeychecking", "ask") or "ask").lower()
    strict = {"ask": "yes", "true": "yes", "false": "no", "off": "no"}.get(strict, strict)
    if strict not in ("yes", "no", "accept-new"):
        strict = "yes"

    timeout = (one("connecttimeout", "none") or "none").lower()
    try:
        seconds = None if timeout == "none" else _seconds(timeout)
    except ValueError:
        raise _ConfigError(f"bad ConnectTimeout {timeout!r}") from None

    command = one("proxycommand")
    if command is not None and command.lower() != "none":
        command = _expand(command, {k: tokens[k] for k in "hnpr"}, "ProxyCommand")
    else:
        command = None
    jump = one("proxyjump", "none") or "none"
    try:
        hops = parse_jump(jump)
    except ValueError as e:
        raise _ConfigError(f"ProxyJump {jump}: {e}") from None

    def files(key: str) -> tuple[str, ...]:
        return tuple(p for p in (one(key) or "").split() if p != "none")

    return SSHTarget(
        target=target,
        hostname=tokens["h"], port=port, user=tokens["r"],
        identity_files=tuple(identities), certificate_files=tuple(certificates),
        identities_only=(one("identitiesonly") or "no").lower() in ("yes", "true"),
        identity_agent=agent,
        user_known_hosts=files("userknownhostsfile"), global_known_hosts=files("globalknownhostsfile"),
        strict_host_key_checking=strict, host_key_alias=one("hostkeyalias"),
        connect_timeout=seconds or None,             # 0 is no timeout, as in OpenSSH
        proxy_command=command, proxy_jump=hops,
        address_family=(one("addressfamily") or "any").lower(), source=source,
        send_env=tuple(o.get("sendenv", [])),
        set_env=tuple((k, v) for k, _, v in (e.partition("=") for e in o.get("setenv", [])) if k),
    )


# --- tokens ---------------------------------------------------------------------

def _first(o: dict[str, list[str]], key: str) -> str | None:
    """An option's first value, or None when it is not set."""
    values = o.get(key)
    return values[0] if values else None


def _local_user() -> str:
    # what ssh uses (the passwd entry), not $USER
    return pwd.getpwuid(os.getuid()).pw_name


def _tokens(original: str, hostname: str, port: int, user: str, alias: str | None) -> dict[str, str]:
    """ssh_config(5) TOKENS for one target (%f %H %I %K %t %T have no use here)."""
    full = socket.gethostname()
    conn = f"{full}{hostname}{port}{user}"
    return {
        "%": "%", "C": hashlib.sha1(conn.encode()).hexdigest(), "d": os.path.expanduser("~"),
        "h": hostname, "i": str(os.getuid()), "k": alias or original, "L": full.split(".")[0],
        "l": full, "n": original, "p": str(port), "r": user, "u": _local_user(),
    }


_TOKEN = re.compile(r"%(.?)|\$\{([^}]*)\}", re.S)


def _expand(value: str, tokens: dict[str, str], keyword: str, env: bool = False) -> str:
    """%x tokens (and ${VAR} if env) in one pass, so no expansion is expanded again."""
    def sub(m: re.Match[str]) -> str:
        if m.group(2) is not None:
            if not env:
                return m.group(0)
            if m.group(2) not in os.environ:
                raise _ConfigError(f"{keyword} {value}: environment variable {m.group(2)} is not set")
            return os.environ[m.group(2)]
        key = m.group(1)
        if key == "%":
            return "%"
        if key not in tokens:
            raise _ConfigError(f"{keyword} {value}: unknown token %{key}")
        return tokens[key]
    return _TOKEN.sub(sub, value)


def _expand_path(value: str, tokens: dict[str, str], keyword: str) -> str:
    return _expand(os.path.expanduser(value), tokens, keyword, env=True)


def _seconds(text: str) -> float:
    """OpenSSH time format: 90, 90s, 1m30s, 1h."""
    parts = re.fullmatch(r"(?:\d+[smhdw]?)+", text) and re.findall(r"(\d+)([smhdw]?)", text)
    if not parts:
        raise ValueError(text)
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return float(sum(int(n) * scale[unit] for n, unit in parts))


# --- the fallback parser ------------------------------------------------------------

# Keywords that may repeat, each line adding a value (duplicates dropped, as OpenSSH does).
_REPEATED = ("identityfile", "certificatefile")
_LINE = re.compile(r"\s*([A-Za-z0-9]+)(?:\s*=\s*|\s+|$)(.*)")


@dataclass
class _Pass:
    """One reading of the config files for one target."""

    original: str                    # the host as given: what Host lines match
    options: dict[str, list[str]]
    final: bool = False              # the second pass that `Match final` asks for
    wants_final: bool = False


def _parse_config(target: str, user: str | None, port: int | None,
                  identity_file: str | None) -> dict[str, list[str]]:
    """What `ssh -G` would print, read from ~/.ssh/config and the system file.

    Command-line values first, as ssh sets them before reading any file, so
    they win (first value wins): -l/-p/-i, then user@ or ssh://user@host:port.
    """
    host, target_user, target_port = target, None, None
    if target.lower().startswith("ssh://"):
        try:
            hop = _parse_hop(target)
        except ValueError as e:
            raise _ConfigError(str(e)) from None
        host, target_user, target_port = hop.host, hop.user, hop.port
    elif "@" in target:
        target_user, host = target.rsplit("@", 1)
    options: dict[str, list[str]] = {}
    if user or target_user:
        options["user"] = [user or target_user]  # type: ignore[list-item]
    if port or target_port:
        options["port"] = [str(port or target_port)]
    if identity_file and os.path.exists(identity_file):
        options["identityfile"] = [identity_file]     # ssh -i skips a missing file, so do we

    state = _Pass(original=host, options=options)
    user_file = os.path.expanduser("~/.ssh/config")
    while True:
        _read(user_file, os.path.expanduser("~/.ssh"), state, depth=0)
        _read(SYSTEM_CONFIG, os.path.dirname(SYSTEM_CONFIG), state, depth=0)
        if state.final or not state.wants_final:
            break
        state.final = True           # OpenSSH reads everything again; first values stay

    # the defaults, and the expansions `ssh -G` prints done
    o = state.options
    if "proxyjump" in o and o["proxyjump"][0].lower() == "none":
        del o["proxyjump"]
    if "proxycommand" in o and o["proxycommand"][0].lower() == "none":
        del o["proxycommand"]
    o["host"] = [host]
    o["hostname"] = [_hostname(o, host)]
    o.setdefault("user", [_local_user()])
    o.setdefault("port", ["22"])
    o.setdefault("identityfile", list(DEFAULT_IDENTITY_FILES))
    port_n = int(o["port"][0]) if o["port"][0].isdigit() else 22
    tokens = _tokens(host, o["hostname"][0], port_n, o["user"][0], _first(o, "hostkeyalias"))
    known = (o.get("userknownhostsfile") or [DEFAULT_USER_KNOWN_HOSTS])[0]
    o["userknownhostsfile"] = [" ".join(_expand_path(p, tokens, "UserKnownHostsFile")
                                        for p in known.split())]
    o.setdefault("globalknownhostsfile", [DEFAULT_GLOBAL_KNOWN_HOSTS])
    agent = _first(o, "identityagent")
    if agent and agent not in ("none", "SSH_AUTH_SOCK") and not re.match(r"\$[^{]", agent):
        o["identityagent"] = [_expand_path(agent, tokens, "IdentityAgent")]
    return o


def _hostname(o: dict[str, list[str]], original: str) -> str:
    """HostName with its %h (the name given) expanded, else that name; lowercase, as ssh makes it."""
    if "hostname" not in o:
        return original.lower()
    return _expand(o["hostname"][0], {"h": original}, "HostName").lower()


def _read(path: str, base: str, state: _Pass, depth: int) -> None:
    """Apply one config file. `base`: where relative Include paths start
    (~/.ssh for the user's files, /etc/ssh for the system's, as in OpenSSH)."""
    if depth > MAX_INCLUDE_DEPTH:
        raise _ConfigError(f"{path}: too many recursive configuration includes")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise _ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    o = state.options
    active = True                    # lines before the first Host/Match apply to all
    for number, line in enumerate(lines, 1):
        m = _LINE.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        keyword, value = m.group(1).lower(), m.group(2).strip()
        where = f"{path} line {number}"
        if not value:
            raise _ConfigError(f"{where}: no argument after keyword {keyword!r}")
        if keyword == "host":
            active = match_pattern_list(state.original, _split(value, where)) is True
        elif keyword == "match":
            active = _match(value, state, where)
        elif not active:
            continue
        elif keyword == "include":
            # the included file starts active and its Host lines do not leak out
            for pattern in _split(value, where):
                pattern = os.path.expanduser(pattern)
                for included in sorted(glob.glob(os.path.join(base, pattern))):
                    _read(included, base, state, depth + 1)
        elif keyword == "sendenv":
            # every line adds its patterns; `-PATTERN` takes back those listed before
            for pattern in _split(value, where):
                listed = o.setdefault(keyword, [])
                if pattern.startswith("-"):
                    listed[:] = [p for p in listed if not match_pattern(p, pattern[1:])]
                elif pattern not in listed:
                    listed.append(pattern)
        elif keyword == "setenv":
            if keyword not in o:        # the first SetEnv line that applies is the one
                first: dict[str, str] = {}      # (a name given twice: its first value)
                for entry in _split(value, where):
                    first.setdefault(entry.partition("=")[0], entry)
                o[keyword] = list(first.values())
        elif keyword in _REPEATED:
            value = _split(value, where)[0]
            o.setdefault(keyword, [])
            if value not in o[keyword]:
                o[keyword].append(value)
        elif keyword == "proxycommand":
            # One excludes the other, the first seen wins; but OpenSSH 9.2 lets
            # a ProxyCommand after `ProxyJump none` apply. It keeps the whole line.
            if "proxycommand" not in o and o.get("proxyjump", ["none"])[0].lower() == "none":
                o[keyword] = [value]
        elif keyword == "proxyjump":
            if "proxycommand" not in o and "proxyjump" not in o:
                o[keyword] = [_split(value, where)[0]]
        elif keyword not in o:
            o[keyword] = [" ".join(_split(value, where))]


def _split(value: str, where: str) -> list[str]:
    try:
        words = shlex.split(value, comments=True)
    except ValueError as e:
        raise _ConfigError(f"{where}: {e}") from None
    if not words:
        raise _ConfigError(f"{where}: missing argument")
    return words


def _match(value: str, state: _Pass, where: str) -> bool:
    """One Match line: every criterion must hold (each may be negated with !)."""
    words = _split(value, where)
    o = state.options
    result = True
    while words:
        word = words.pop(0)
        negate = word.startswith("!")
        criterion = word.lstrip("!").lower()
        if criterion == "all":
            ok = True
        elif criterion in ("canonical", "final"):
            if criterion == "final":
                state.wants_final = True
            ok = state.final         # we never canonicalise: both hold in the final pass only
        elif criterion in ("host", "originalhost", "user", "localuser", "exec"):
            if not words:
                raise _ConfigError(f"{where}: Match {criterion} needs an argument")
            arg = words.pop(0)
            if criterion == "exec":
                ok = _match_exec(arg, state, where) if result else False
            else:
                subject = {
                    "host": _hostname(o, state.original),
                    "originalhost": state.original,
                    "user": (o.get("user") or [_local_user()])[0],
                    "localuser": _local_user(),
                }[criterion]
                ok = match_pattern_list(subject, arg.split(",")) is True
        else:
            raise _ConfigError(f"{where}: unsupported Match attribute {criterion}")
        result = result and (ok != negate)
    return result


def _match_exec(command: str, state: _Pass, where: str) -> bool:
    o = state.options
    port = (o.get("port") or ["22"])[0]
    tokens = _tokens(state.original, _hostname(o, state.original), int(port) if port.isdigit() else 22,
                     (o.get("user") or [_local_user()])[0], _first(o, "hostkeyalias"))
    shell = os.environ.get("SHELL") or "/bin/sh"
    try:
        done = subprocess.run([shell, "-c", _expand(command, tokens, "Match exec")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=SSH_G_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise _ConfigError(f"{where}: Match exec {command!r} did not finish in {SSH_G_TIMEOUT:g}s") from None
    except OSError:
        return False
    return done.returncode == 0
