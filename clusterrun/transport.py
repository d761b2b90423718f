"""Transport: one connection per node, over which every command of a run goes.

`localhost` nodes run commands as local subprocesses; every other node is one
paramiko SSH connection honouring ~/.ssh/config (HostName, User, Port,
IdentityFile, UserKnownHostsFile, StrictHostKeyChecking, ProxyJump) and
~/.ssh/known_hosts. Unknown host keys are refused unless asked to accept new
ones; a changed host key is always refused.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Protocol, Sequence

# paramiko imports invoke (a task runner) only to run `Match exec` lines of an
# ssh config, and that import is a third of paramiko's; every clusterrun command
# pays it at start. Import paramiko without it, and fetch it if a config needs it.
if "invoke" not in sys.modules:
    sys.modules["invoke"] = None  # type: ignore[assignment]  # makes `import invoke` fail fast
    try:
        import paramiko
    finally:
        del sys.modules["invoke"]
import paramiko  # noqa: E402

from .errors import UnreachableError
from .hostsfile import Host

# paramiko logs connection failures with tracebacks through the root logger;
# clusterrun reports them itself, per node, in words.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False



class Process(Protocol):
    """A command running on a node."""

    stdout: IO[bytes]

    def send(self, data: bytes) -> None: ...
    def set_read_timeout(self, seconds: float | None) -> None: ...
    def close_stdin(self) -> None: ...
    def read_some(self, n: int) -> bytes: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def stderr_text(self) -> str: ...
    def close(self) -> None: ...


class Transport(Protocol):
    name: str
    peer_addr: str          # the address we actually reached the node at

    def exec(self, command: str, merge_stderr: bool = False) -> Process: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


# --- localhost ---------------------------------------------------------------

class LocalProcess:
    def __init__(self, command: str, merge_stderr: bool = False) -> None:
        self._err = tempfile.TemporaryFile()
        # Like sshd: the user's shell runs the command line. A session of its own:
        # a Ctrl-C on the terminal reaches the controller only, which then tears
        # the job down in order.
        shell = os.environ.get("SHELL") or "/bin/sh"
        self._p = subprocess.Popen(
            [shell, "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else self._err, start_new_session=True,
        )
        assert self._p.stdout is not None
        self.stdout = self._p.stdout

    def read_some(self, n: int) -> bytes:
        """Whatever output is there (at least one byte), or b"" at the end."""
        return self.stdout.read1(n)  # type: ignore[attr-defined]

    def send(self, data: bytes) -> None:
        try:
            assert self._p.stdin is not None
            self._p.stdin.write(data)
            self._p.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close_stdin(self) -> None:
        if self._p.stdin:
            self._p.stdin.close()

    def set_read_timeout(self, seconds: float | None) -> None:
        pass                        # a local pipe does not go silent without the process ending

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self) -> str:
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self._p.poll() is None:
            self._p.kill()
            self._p.wait()
        for f in (self._p.stdin, self._p.stdout, self._err):
            if f:
                f.close()


class LocalTransport:
    peer_addr = "127.0.0.1"

    def __init__(self, name: str) -> None:
        self.name = name

    def exec(self, command: str, merge_stderr: bool = False) -> Process:
        return LocalProcess(command, merge_stderr)

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


# --- ssh -------------------------------------------------------------------------

@dataclass(frozen=True)
class SSHTarget:
    """Where and how to connect, after ~/.ssh/config; the hosts file wins."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts: tuple[str, ...]
    strict: str                     # yes | accept-new | no
    proxy_jump: str | None


def load_ssh_config() -> paramiko.SSHConfig:
    path = os.path.expanduser("~/.ssh/config")
    if os.path.exists(path):
        return paramiko.SSHConfig.from_path(path)
    return paramiko.SSHConfig()


def resolve_target(host: Host, config: paramiko.SSHConfig) -> SSHTarget:
    alias = host.host
    user = None
    if "@" in alias:
        user, alias = alias.split("@", 1)
    try:
        c = config.lookup(alias)
    except ImportError:             # a `Match exec` line: it needs invoke after all
        import invoke
        paramiko.config.invoke = invoke
        c = config.lookup(alias)
    user = host.user or user or c.get("user") or getpass.getuser()
    port = host.port or int(c.get("port", 22))
    idents = [host.identity_file] if host.identity_file else list(c.get("identityfile", []))
    known = c.get("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2").split()
    strict = str(c.get("stricthostkeychecking", "ask")).lower()
    strict = {"ask": "yes", "true": "yes", "false": "no", "off": "no"}.get(strict, strict)
    proxy = c.get("proxyjump")
    return SSHTarget(
        alias=alias, hostname=c.get("hostname", alias), port=port, user=user,
        identity_files=tuple(os.path.expanduser(i) for i in idents),
        known_hosts=tuple(os.path.expanduser(k) for k in known) + ("/etc/ssh/ssh_known_hosts",),
        strict=strict, proxy_jump=None if proxy in (None, "none") else proxy,
    )


_known_hosts_lock = threading.Lock()
_known_hosts_cache: dict[tuple[str, ...], paramiko.HostKeys] = {}


def known_hosts(paths: tuple[str, ...], node: str) -> paramiko.HostKeys:
    """The host keys of these known_hosts files, read once per process."""
    with _known_hosts_lock:
        keys = _known_hosts_cache.get(paths)
        if keys is None:
            keys = paramiko.HostKeys()
            for path in paths:
                try:
                    keys.load(path)
                except (OSError, paramiko.SSHException) as e:
                    raise UnreachableError(f"{node}: cannot read known hosts file {path}: {e}") from None
            _known_hosts_cache[paths] = keys
        return keys


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """Like OpenSSH's accept-new: record an unknown key; changed keys fail anyway."""

    def __init__(self, path: str) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        with _known_hosts_lock:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            client._system_host_keys.add(hostname, key.get_name(), key)   # known from now on


class _Transport(paramiko.Transport):
    # paramiko's transport thread wakes every _active_check_timeout seconds to see
    # whether it should stop (0.1 by default): ten wake-ups a second per node for
    # the whole of a run. Closing does not wait for it; keepalives still go out.
    _active_check_timeout = 1.0


class SSHProcess:
    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self.stdout = chan.makefile("rb")
        self._stdin = chan.makefile_stdin("wb")

    def read_some(self, n: int) -> bytes:
        """Whatever output is there (at least one byte), or b"" at the end (not with .stdout)."""
        return self._chan.recv(n)

    def send(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
            self._stdin.flush()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def close_stdin(self) -> None:
        self._chan.shutdown_write()

    def set_read_timeout(self, seconds: float | None) -> None:
        """Reads raise socket.timeout after this long without a byte."""
        self._chan.settimeout(seconds)

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._chan.status_event.wait(timeout):
            return None
        return self._chan.recv_exit_status()

    def stderr_text(self) -> str:
        chunks = []
        while self._chan.recv_stderr_ready():
            chunks.append(self._chan.recv_stderr(65536))
        return b"".join(chunks).decode("utf-8", "replace")

    def close(self) -> None:
        self._chan.close()


class SSHTransport:
    def __init__(self, name: str, client: paramiko.SSHClient, peer_addr: str) -> None:
        self.name = name
        self.client = client
        self.peer_addr = peer_addr

    def exec(self, command: str, merge_stderr: bool = False) -> Process:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise UnreachableError(f"{self.name}: the SSH connection was lost")
        chan = transport.open_session(timeout=30)
        chan.set_combine_stderr(merge_stderr)
        chan.exec_command(command)
        return SSHProcess(chan)

    def alive(self) -> bool:
        t = self.client.get_transport()
        return t is not None and t.is_active()

    def close(self) -> None:
        self.client.close()


def connect_ssh(host: Host, config: paramiko.SSHConfig, timeout: float, accept_new: bool) -> SSHTransport:
    """Open one authenticated SSH connection, or raise UnreachableError saying why."""
    t = resolve_target(host, config)
    where = f"{host.name}: {t.user}@{t.hostname}:{t.port}"
    client = paramiko.SSHClient()
    # Parsed once per set of files, not once per node: N nodes x K entries adds up.
    # (paramiko offers no public way to share one HostKeys between clients.)
    client._system_host_keys = known_hosts(tuple(p for p in t.known_hosts if os.path.exists(p)), host.name)
    if accept_new or t.strict in ("accept-new", "no"):
        client.set_missing_host_key_policy(_AcceptNew(t.known_hosts[0]))
    else:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        sock = _open_socket(t, host.name, config, timeout, accept_new)
        peer = sock.getpeername()[0] if isinstance(sock, socket.socket) else t.hostname
        client.connect(
            t.hostname, port=t.port, username=t.user, sock=sock,
            key_filename=list(t.identity_files) or None, timeout=timeout,
            banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
            allow_agent=True, look_for_keys=True, transport_factory=_Transport,
        )
    except UnreachableError:
        client.close()
        raise
    except paramiko.BadHostKeyException:
        client.close()
        raise UnreachableError(
            f"{where}: the host key has CHANGED since it was recorded in known_hosts; refusing to "
            "connect (it may be a different machine, or an attack). If the change is expected, "
            f"remove the old key: ssh-keygen -R {t.hostname}"
        ) from None
    except paramiko.SSHException as e:
        client.close()
        msg = str(e)
        if "not found in known_hosts" in msg:
            raise UnreachableError(
                f"{where}: unknown host key. Trust it with --accept-new-host-keys, or "
                f"`ssh {host.host}` once, or `StrictHostKeyChecking accept-new` in ~/.ssh/config"
            ) from None
        if isinstance(e, paramiko.AuthenticationException):
            raise UnreachableError(f"{where}: authentication failed ({msg})") from None
        raise UnreachableError(f"{where}: SSH failed: {msg or type(e).__name__}") from None
    except socket.timeout:
        client.close()
        raise UnreachableError(f"{where}: timed out after {timeout:g}s") from None
    except OSError as e:
        client.close()
        raise UnreachableError(f"{where}: {e.strerror or e}") from None
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(15)
    return SSHTransport(host.name, client, peer)


def _open_socket(t: SSHTarget, node: str, config: paramiko.SSHConfig, timeout: float, accept_new: bool):
    if t.proxy_jump:
        if "," in t.proxy_jump:
            raise UnreachableError(f"{node}: ProxyJump through more than one host ({t.proxy_jump}) "
                                   "is not supported yet; use a single jump host")
        jump_host = Host(host=t.proxy_jump, name=t.proxy_jump, nproc_per_node=1)
        jump = connect_ssh(jump_host, config, timeout, accept_new)
        tr = jump.client.get_transport()
        assert tr is not None
        return tr.open_channel("direct-tcpip", (t.hostname, t.port), ("127.0.0.1", 0), timeout=timeout)
    try:
        return socket.create_connection((t.hostname, t.port), timeout=timeout)
    except socket.gaierror:
        raise UnreachableError(f"{node}: cannot resolve host name {t.hostname!r}") from None
    except ConnectionRefusedError:
        raise UnreachableError(
            f"{node}: connection refused by {t.hostname}:{t.port} (is sshd running there?)"
        ) from None


def connect_each(hosts: Sequence[Host], timeout: float, accept_new: bool = False
                 ) -> list[tuple[Transport | None, str, float]]:
    """Connect to every node in parallel: (transport or None, error, seconds) per node."""
    config = load_ssh_config()

    def one(host: Host) -> tuple[Transport | None, str, float]:
        t0 = time.monotonic()
        try:
            return connect_node(host, timeout, accept_new, config), "", time.monotonic() - t0
        except UnreachableError as e:
            return None, str(e), time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=min(64, len(hosts))) as pool:
        return list(pool.map(one, hosts))


def connect_all(
    hosts: Sequence[Host], timeout: float, accept_new: bool = False,
    consequence: str = "nothing was started",
) -> list[Transport]:
    """Connect to every node in parallel; all or nothing.

    Raises UnreachableError naming every node that failed (and closes the rest),
    so that nothing is started anywhere unless every node is ready.
    """
    results = connect_each(hosts, timeout, accept_new)
    errors = [err for t, err, _ in results if t is None]
    if errors:
        for t, _, _ in results:
            if t is not None:
                t.close()
        raise UnreachableError(f"cannot reach every node, {consequence}:\n  " + "\n  ".join(errors))
    return [t for t, _, _ in results if t is not None]


def connect_node(host: Host, timeout: float, accept_new: bool = False,
                 config: paramiko.SSHConfig | None = None) -> Transport:
    """One node's transport: local for localhost, else an SSH connection."""
    if host.is_local:
        return LocalTransport(host.name)
    return connect_ssh(host, config or load_ssh_config(), timeout, accept_new)

