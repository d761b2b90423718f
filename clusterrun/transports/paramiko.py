"""SSH on paramiko, connecting as OpenSSH would for the same configuration.

What a target means comes from `sshconfig` (OpenSSH's own `ssh -G`); this module
acts on it: ProxyCommand, ProxyJump chains (every hop checked and authenticated
as its own target), one shared connection per jump host for all the nodes behind
it, the identities OpenSSH would offer in its order (certificates, agent keys,
files; IdentitiesOnly, IdentityAgent, CertificateFile), and host keys checked
against known_hosts as OpenSSH reads it (`knownhosts`: markers, hashes,
HostKeyAlias). Every error names the node it is about.
"""

from __future__ import annotations

import copy
import functools
import os
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import logging

from .. import compat

compat.import_paramiko()        # first: paramiko without invoke (compat.py)
import paramiko  # noqa: E402
from paramiko.agent import AgentSSH  # noqa: E402
from paramiko.pkey import PublicBlob  # noqa: E402

from . import knownhosts  # noqa: E402
from ..errors import UnreachableError  # noqa: E402
from .sshconfig import Hop, SSHTarget, resolve  # noqa: E402

# paramiko logs connection failures with tracebacks through its logger;
# clusterrun reports them itself, per node, in words.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

KEEPALIVE = 15                      # seconds between keepalives on every connection
STDERR_TAIL = 64 * 1024             # bytes of a session's stderr kept for its messages


_Transport = compat.quiet_transport()     # paramiko's, waking once a second when idle


class Failed(Exception):
    """Why one hop could not be connected (the caller adds whose node it is)."""


class _NoHandshake(Failed):
    """No SSH server spoke to us (through a ProxyCommand: its stderr says why)."""


# --- sessions ------------------------------------------------------------------

_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


class _StderrTail:
    """A session's stderr, read as it arrives, of which the last STDERR_TAIL bytes
    are kept (for login and agent failure messages).

    Read at once because stdout and stderr share the channel's window (2 MB):
    stderr left unread fills it, and then stdout stalls too (a setup's compiler
    warnings would hang the agent's start). One thread per session, ending at the
    channel's EOF or close, whichever comes first.
    """

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._cut = False                       # bytes were dropped before _buf
        self._done = threading.Event()
        threading.Thread(target=self._drain, name=f"stderr of {chan.get_name()}", daemon=True).start()

    def _drain(self) -> None:
        try:
            while True:
                try:
                    data = self._chan.recv_stderr(65536)
                except socket.timeout:           # the read timeout set for stdout applies here too
                    continue
                if not data:                    # EOF, or the channel closed
                    return
                self._keep(data)
        except (OSError, EOFError, paramiko.SSHException):
            return
        finally:
            self._done.set()

    def _keep(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if len(self._buf) > 2 * STDERR_TAIL:    # trimmed in batches, not per chunk
                del self._buf[:-STDERR_TAIL]
                self._cut = True

    def text(self, ended: bool) -> str:
        """The tail so far; once the session has `ended`, all of it (given a moment
        for the reader to take what the channel still holds)."""
        if ended:
            self._done.wait(2.0)
        with self._lock:
            tail = bytes(self._buf[-STDERR_TAIL:])
            cut = self._cut or len(self._buf) > STDERR_TAIL
        if cut:                                 # not half a character where the cut fell
            tail = tail.lstrip(_UTF8_CONTINUATION)
        return tail.decode("utf-8", "replace")


class SSHProcess:
    """A command running over one SSH channel (transport.Process)."""

    def __init__(self, chan: paramiko.Channel, merge_stderr: bool = False) -> None:
        self._chan = chan
        self.stdout = chan.makefile("rb")
        self._stdin = chan.makefile_stdin("wb")
        # (merged, stderr comes with stdout, whose reader keeps the window open)
        self._stderr = None if merge_stderr else _StderrTail(chan)

    def read_some(self, n: int) -> bytes:
        """Whatever output is there (at least one byte), or b"" at the end (not with .stdout)."""
        return self._chan.recv(n)

    def send(self, data: bytes) -> bool:
        try:
            self._stdin.write(data)
            self._stdin.flush()
            return True
        except (OSError, EOFError, paramiko.SSHException):
            return False

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
        """The last STDERR_TAIL bytes of stderr so far (up to its end once the session has ended)."""
        if self._stderr is None:
            return ""
        c = self._chan
        return self._stderr.text(ended=bool(c.eof_received or c.closed or c.exit_status_ready()))

    def close(self) -> None:
        self._chan.close()


class SSHTransport:
    """One authenticated connection to a node (transport.Transport)."""

    def __init__(self, name: str, conn: "_Conn", peer_addr: str,
                 env: Sequence[tuple[str, str]] = ()) -> None:
        self.name = name
        self._conn = conn
        self.peer_addr = peer_addr
        self._env = env                 # SendEnv's and SetEnv's variables, for every session

    def exec(self, command: str, merge_stderr: bool = False) -> SSHProcess:
        t = self._conn.transport
        if not t.is_active():
            raise UnreachableError(f"{self.name}: the SSH connection was lost")
        chan = t.open_session(timeout=30)
        chan.set_combine_stderr(merge_stderr)
        for key, value in self._env:    # env requests, as ssh sends them (sshd's AcceptEnv decides)
            chan.set_environment_variable(key, value)
        chan.exec_command(command)
        return SSHProcess(chan, merge_stderr)

    def alive(self) -> bool:
        return self._conn.transport.is_active()

    def close(self, linger: bool = False) -> None:
        self._conn.release()


# --- connections -----------------------------------------------------------------

@dataclass(eq=False)
class _Conn:
    """An authenticated paramiko transport, with what must go when it goes."""

    transport: paramiko.Transport
    label: str                                  # user@host:port, for messages
    on_close: Callable[[], None]
    users: int = 1
    key: tuple | None = None                    # set for a shared jump host

    def release(self) -> None:
        if self.key is not None:
            _bastions.release(self, self.key)
        else:
            self.close()

    def close(self) -> None:
        self.transport.close()
        self.on_close()


class _Bastions:
    """Jump-host connections, one per distinct hop chain, shared by every node
    behind it (32 nodes behind one bastion make one connection to it, not 32:
    sshd's MaxStartups would drop some). Closed when its last node lets go."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[tuple, _Conn] = {}
        self._opening: dict[tuple, threading.Lock] = {}
        self._failed: dict[tuple, tuple[float, Failed]] = {}

    def acquire(self, key: tuple, open_: Callable[[], _Conn]) -> tuple[_Conn, bool]:
        """The live connection for `key` (one more user), and whether it was opened now."""
        since = time.monotonic()
        with self._lock:
            gate = self._opening.setdefault(key, threading.Lock())
        with gate:                               # one thread opens it, the others wait for it
            with self._lock:
                conn = self._conns.get(key)
                if conn is not None and conn.transport.is_active():
                    conn.users += 1
                    return conn, False
                failed = self._failed.get(key)
            if failed is not None and failed[0] >= since:
                raise failed[1]                  # it failed while we waited: same answer, no retry
            try:
                conn = open_()
            except Failed as e:
                with self._lock:
                    self._failed[key] = (time.monotonic(), e)
                raise
            conn.key = key
            with self._lock:
                self._conns[key] = conn
            return conn, True

    def release(self, conn: _Conn, key: tuple) -> None:
        """One user of `conn`, the connection for `key`, lets go."""
        with self._lock:
            conn.users -= 1
            last = conn.users <= 0
            if last and self._conns.get(key) is conn:
                del self._conns[key]
        if last:
            conn.close()


_bastions = _Bastions()


def connect(node: str, target: SSHTarget, timeout: float | None, accept_new: bool) -> SSHTransport:
    """One node's authenticated connection, or UnreachableError naming the node."""
    try:
        conn, peer = _open(target, None, timeout, accept_new, node)
    except Failed as e:
        raise UnreachableError(f"{node}: {e}") from None
    return SSHTransport(node, conn, peer, target.session_env(os.environ))


def _open(target: SSHTarget, via: _Conn | None, timeout: float | None, accept_new: bool,
          node: str) -> tuple[_Conn, str]:
    """Connect and authenticate to `target`, through `via` (the previous hop, whose
    share this connection then holds) if given, else through the target's own
    ProxyJump or ProxyCommand, else directly."""
    limit = timeout or target.connect_timeout or 10.0
    label = f"{target.user}@{target.hostname}:{target.port}"
    cleanup: list[Callable[[], None]] = []

    def on_close() -> None:
        for f in reversed(cleanup):
            f()

    sock: socket.socket | paramiko.Channel | None = None
    try:
        if via is None and target.proxy_jump:
            via = _jump(target.proxy_jump, timeout, accept_new, node)
        if via is not None:
            cleanup.append(via.release)
            sock, peer = _channel(via, target, limit), target.hostname
        elif target.proxy_command:
            sock, stop, said = _proxy_command(target.proxy_command)
            cleanup.append(stop)
            peer = target.hostname
        else:
            sock = _tcp(target, limit, label)
            peer = sock.getpeername()[0]
        try:
            t = _handshake(sock, target, limit, accept_new, label)
        except _NoHandshake as e:
            if via is None and target.proxy_command:    # its own words say why
                words = said()
                raise Failed(f"ProxyCommand {target.proxy_command!r} failed"
                             + (f": {words}" if words else f" (no SSH server answered: {e})")) from None
            raise Failed(str(e)) from None
        try:
            _authenticate(t, target, label)
        except BaseException:
            t.close()
            raise
    except BaseException:
        try:
            if sock is not None:
                sock.close()
        finally:
            on_close()
        raise
    t.set_keepalive(KEEPALIVE)
    return _Conn(t, label, on_close), peer


def _jump(hops: tuple[Hop, ...], timeout: float | None, accept_new: bool, node: str) -> _Conn:
    """The connection to the last hop of a ProxyJump chain (one share of it for the
    caller), every hop shared with the other nodes behind it.

    As OpenSSH does: the first hop is a target of its own (its own ProxyJump or
    ProxyCommand apply); each later hop is reached through the one before it.
    """
    conn: _Conn | None = None
    chain: tuple = ()
    for hop in hops:
        t = _resolve_hop(hop, node)
        chain = chain + ((t.user, t.hostname, t.port),)
        via = conn

        def open_(t: SSHTarget = t, via: _Conn | None = via) -> _Conn:
            try:          # the new hop's connection takes over our share of `via`
                return _open(t, via, timeout, accept_new, node)[0]
            except Failed as e:
                raise Failed(f"jump host {t.user}@{t.hostname}:{t.port}: {e}") from None

        conn, opened = _bastions.acquire(chain, open_)
        if via is not None and not opened:
            via.release()                   # an existing hop: our share of `via` is not needed
    assert conn is not None
    return conn


@functools.lru_cache(maxsize=256)
def _resolve_hop_cached(host: str, user: str | None, port: int | None) -> SSHTarget:
    return resolve(host, user=user, port=port, node=host)


def _resolve_hop(hop: Hop, node: str) -> SSHTarget:
    """A jump host as OpenSSH resolves it (once per process, not once per node)."""
    try:
        return _resolve_hop_cached(hop.host, hop.user, hop.port)
    except UnreachableError as e:
        raise Failed(f"jump host {_hop_text(hop)}: {str(e).removeprefix(hop.host + ': ')}") from None


def _hop_text(hop: Hop) -> str:
    return (f"{hop.user}@" if hop.user else "") + hop.host + (f":{hop.port}" if hop.port else "")


def _channel(via: _Conn, target: SSHTarget, timeout: float) -> paramiko.Channel:
    try:
        return via.transport.open_channel("direct-tcpip", (target.hostname, target.port),
                                          ("127.0.0.1", 0), timeout=timeout)
    except paramiko.ChannelException as e:
        raise Failed(f"{via.label} could not connect to {target.hostname}:{target.port} "
                     f"for us ({e.text or e})") from None
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise Failed(f"{via.label} could not connect to {target.hostname}:{target.port} "
                     f"for us ({e or type(e).__name__})") from None


def _tcp(target: SSHTarget, timeout: float, label: str) -> socket.socket:
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(target.address_family, 0)
    where = f"{target.hostname}:{target.port}"
    try:
        infos = socket.getaddrinfo(target.hostname, target.port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Failed(f"cannot resolve host name {target.hostname!r} ({e.strerror})") from None
    err: OSError | None = None
    for fam, kind, proto, _, addr in infos:     # every address, in order, as ssh tries them
        s = socket.socket(fam, kind, proto)
        s.settimeout(timeout)
        try:
            s.connect(addr)
            return s
        except OSError as e:
            s.close()
            err = e
    if isinstance(err, ConnectionRefusedError):
        raise Failed(f"connection refused by {where} (is sshd running there?)")
    if isinstance(err, socket.timeout):
        raise Failed(f"{label}: timed out after {timeout:g}s")
    raise Failed(f"{label}: {getattr(err, 'strerror', None) or err}")


def _proxy_command(command: str) -> tuple[socket.socket, Callable[[], None], Callable[[], str]]:
    """Start a ProxyCommand as OpenSSH does (`$SHELL -c "exec CMD"`, the user's own
    shell line); the SSH stream runs over a socket pair with it."""
    ours, theirs = socket.socketpair()
    err = tempfile.TemporaryFile()
    shell = os.environ.get("SHELL") or "/bin/sh"
    try:
        proc = subprocess.Popen([shell, "-c", "exec " + command], stdin=theirs.fileno(),
                                stdout=theirs.fileno(), stderr=err, start_new_session=True)
    except OSError as e:
        ours.close()
        raise Failed(f"ProxyCommand {command!r} could not start: {e.strerror or e}") from None
    finally:
        theirs.close()

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err.close()

    def said() -> str:
        """The last line it wrote to stderr (why it failed), if any."""
        try:
            err.seek(0)
            lines = err.read().decode("utf-8", "replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        return lines[-1] if lines else ""

    return ours, stop, said


# --- handshake and host key ----------------------------------------------------------

def _handshake(sock: socket.socket | paramiko.Channel, target: SSHTarget, timeout: float, accept_new: bool,
               label: str) -> paramiko.Transport:
    names = knownhosts.host_names(target.hostname, target.port, target.host_key_alias)
    try:
        known = knownhosts.KnownHosts.load(target.user_known_hosts + target.global_known_hosts)
    except OSError as e:
        raise Failed(f"cannot read known_hosts: {e}") from None
    t = _Transport(sock)
    t.banner_timeout = t.handshake_timeout = t.auth_timeout = timeout
    t.channel_timeout = timeout
    # Offer the host key types known_hosts has for this host first, as OpenSSH does,
    # so that a host with several keys shows the one on record.
    types = known.known_types(names)
    if types:
        opts = t.get_security_options()
        wanted = [k for k in opts.key_types if _base_type(k) in {_base_type(x) for x in types}]
        opts.key_types = wanted + [k for k in opts.key_types if k not in wanted]
    try:
        t.start_client(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as e:
        t.close()
        if isinstance(e, socket.timeout):
            raise _NoHandshake(f"{label}: the SSH handshake timed out") from None
        raise _NoHandshake(f"{label}: SSH handshake failed: {e or type(e).__name__}") from None
    key = t.get_remote_server_key()
    check = known.check(names, key.get_name(), key.asbytes())
    V = knownhosts.Verdict
    if check.verdict is V.KNOWN:
        return t
    if check.verdict is V.UNKNOWN and (accept_new or target.strict_host_key_checking in ("accept-new", "no")):
        if not target.user_known_hosts:
            t.close()
            raise Failed(f"{label}: unknown host key and no UserKnownHostsFile to record it in")
        try:
            knownhosts.append_key(target.user_known_hosts[0], names[0], key.get_name(), key.asbytes())
        except OSError as e:
            t.close()
            raise Failed(f"{label}: cannot record its host key in {target.user_known_hosts[0]}: {e}") from None
        return t
    t.close()
    raise Failed(_refusal(check, target, label, names, key))


def _refusal(check: "knownhosts.HostKeyCheck", target: SSHTarget, label: str,
             names: tuple[str, ...], key: paramiko.PKey) -> str:
    V = knownhosts.Verdict
    where = f" ({check.path}:{check.line})" if check.path else ""
    if check.verdict is V.REVOKED:
        return (f"{label}: its host key ({key.get_name()} {key.fingerprint}) is marked @revoked"
                f"{where}; refusing to connect")
    if check.verdict is V.CHANGED:
        return (f"{label}: the host key has CHANGED since it was recorded{where}; refusing to "
                "connect (it may be a different machine, or an attack). If the change is "
                f"expected, remove the old key: ssh-keygen -R {names[0]}")
    if check.verdict is V.CA_ONLY:
        return (f"{label}: known_hosts trusts this host only through a @cert-authority line{where}, "
                "and host certificates cannot be checked on the paramiko transport: use "
                "`transport: openssh` for this host (or --transport openssh), or record its key: "
                f"ssh-keyscan -p {target.port} {target.hostname} >> ~/.ssh/known_hosts")
    return (f"{label}: unknown host key. Trust it with --accept-new-host-keys, or "
            f"`ssh {target.target}` once, or `StrictHostKeyChecking accept-new` in ~/.ssh/config")


def _base_type(key_type: str) -> str:
    return "ssh-rsa" if key_type.startswith("rsa-sha2") else key_type


# --- authentication -------------------------------------------------------------------

def _authenticate(t: paramiko.Transport, target: SSHTarget, label: str) -> None:
    """Offer what OpenSSH would, in its order, until one is accepted."""
    keys, notes = identities(target)
    for key in keys:
        try:
            more = t.auth_publickey(target.user, key)
        except paramiko.BadAuthenticationType as e:
            raise Failed(f"{label}: the server does not accept public keys (it allows: "
                         f"{', '.join(e.allowed_types) or 'nothing'}); use `transport: openssh`, "
                         "which can answer password and keyboard-interactive prompts") from None
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise Failed(f"{label}: authentication failed: {e or type(e).__name__}"
                         + (" (the server may have closed after too many keys: MaxAuthTries; "
                            "IdentitiesOnly yes with IdentityFile limits the keys offered)"
                            if "No existing session" in str(e) or isinstance(e, EOFError) else "")
                         ) from None
        if more:
            raise Failed(f"{label}: the key was accepted but the server asks for more "
                         f"({', '.join(more)}); use `transport: openssh` for this host")
        return
    tried = f"{len(keys)} key{'s' if len(keys) != 1 else ''}"
    extra = "; ".join(notes)
    raise Failed(f"{label}: authentication failed: the server accepted none of the {tried} offered"
                 + (f" ({extra})" if extra else ""))


def identities(target: SSHTarget) -> tuple[list[paramiko.PKey], list[str]]:
    """The keys OpenSSH would offer, in its order: CertificateFile certificates (with
    their private half from the agent or a file), then the agent's keys (only those
    named by IdentityFile under IdentitiesOnly), then the remaining IdentityFiles.
    Also notes on what was skipped, for the message if nothing works."""
    notes: list[str] = []
    agent = _agent(target.identity_agent, notes)
    agent_keys = list(agent.get_keys()) if agent else []
    files: list[tuple[str, bytes | None]] = []      # (path, public blob if known)
    for path in target.identity_files:
        blob = _public_blob(path)
        if blob is not None or os.path.exists(path):
            files.append((path, blob))
    certs = [c for c in (_load_cert(p, notes) for p in target.certificate_files) if c is not None]
    for path, _ in files:                          # ssh also tries <file>-cert.pub by itself
        c = _load_cert(_strip_pub(path) + "-cert.pub", None)
        if c is not None:
            certs.append(c)

    out: list[paramiko.PKey] = []
    by_blob = {k.asbytes(): k for k in agent_keys}
    # Certificates first: each needs its private half, from the agent or a file.
    for cert in certs:
        key: paramiko.PKey | None = by_blob.get(cert.key_blob_plain) if cert.key_blob_plain else None
        if key is None:
            private = next((p for p, b in files if b == cert.key_blob_plain), None)
            key = _load_private(private, notes) if private else None
        if key is None:
            notes.append(f"certificate {cert.path}: no private key for it in the agent or the identity files")
            continue
        k = _copy_with_cert(key, cert)
        if k is not None:
            out.append(k)
    file_blobs = {b for _, b in files if b}
    used: set[bytes] = set()
    for key in agent_keys:
        blob = key.asbytes()
        if blob in file_blobs or not target.identities_only:
            out.append(key)
            used.add(blob)
    for path, blob in files:
        if blob is not None and blob in used:
            continue
        key = _load_private(path, notes)
        if key is not None:
            out.append(key)
    return out, notes


@dataclass
class _Cert:
    path: str
    blob: PublicBlob
    key_blob_plain: bytes | None                   # the certified public key, plain form


def _load_cert(path: str, notes: list[str] | None) -> _Cert | None:
    try:
        blob = PublicBlob.from_file(path)
    except FileNotFoundError:
        if notes is not None:
            notes.append(f"certificate {path}: no such file")
        return None
    except (OSError, ValueError, paramiko.SSHException) as e:
        if notes is not None:
            notes.append(f"certificate {path}: unreadable ({e})")
        return None
    return _Cert(path, blob, _plain_from_cert(blob))


def _plain_from_cert(blob: PublicBlob) -> bytes | None:
    """The plain public key inside an OpenSSH certificate (ed25519, ecdsa, rsa)."""
    m = paramiko.Message(blob.key_blob)
    kind = m.get_text()
    m.get_string()                                  # nonce
    plain = kind.replace("-cert-v01@openssh.com", "")
    out = paramiko.Message()
    out.add_string(plain)
    if plain == "ssh-ed25519":
        out.add_string(m.get_string())
    elif plain.startswith("ecdsa-sha2-"):
        out.add_string(m.get_string())
        out.add_string(m.get_string())
    elif plain == "ssh-rsa":
        out.add_mpint(m.get_mpint())
        out.add_mpint(m.get_mpint())
    else:
        return None
    return out.asbytes()


def _copy_with_cert(key: paramiko.PKey, cert: _Cert) -> paramiko.PKey:
    """`key` presenting `cert` (a copy: the plain key is offered on its own as well)."""
    if isinstance(key, paramiko.AgentKey):      # (its attribute proxy defeats copy.copy)
        k: paramiko.PKey = paramiko.AgentKey(key.agent, key.blob, key.comment)
    else:
        k = copy.copy(key)
    k.public_blob = cert.blob
    return k


def _strip_pub(path: str) -> str:
    return path[:-4] if path.endswith(".pub") else path


def _public_blob(path: str) -> bytes | None:
    """The public key of an IdentityFile: from `path.pub`, or `path` itself when it
    names a public key (the agent-held key pattern)."""
    for p in (path + ".pub", path) if not path.endswith(".pub") else (path,):
        try:
            with open(p, "rb") as f:
                head = f.read(16384)
        except OSError:
            continue
        parts = head.split()
        if len(parts) >= 2 and not head.startswith(b"-----"):
            import base64
            import binascii
            try:
                return base64.b64decode(parts[1], validate=True)
            except (binascii.Error, ValueError):
                continue
    return None


def _load_private(path: str, notes: list[str]) -> paramiko.PKey | None:
    if path.endswith(".pub"):
        notes.append(f"{path} is a public key and the agent does not hold its private half")
        return None
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        return None
    except (paramiko.PasswordRequiredException, TypeError):   # (TypeError: cryptography's word for it)
        notes.append(f"{path} is passphrase-protected: add it to your agent (ssh-add {path})")
    except (OSError, ValueError, paramiko.SSHException) as e:
        notes.append(f"{path}: cannot load ({e or type(e).__name__})")
    return None


def _agent(spec: str | None, notes: list[str]) -> AgentSSH | None:
    """The agent IdentityAgent names ("" none; None $SSH_AUTH_SOCK), connected."""
    path = os.environ.get("SSH_AUTH_SOCK") if spec is None else spec
    if not path:
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return compat.agent_on(s)
    except (OSError, paramiko.SSHException) as e:
        s.close()
        notes.append(f"agent {path}: {getattr(e, 'strerror', None) or e}")
        return None
