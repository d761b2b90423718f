"""OpenSSH transport: every session through the system `ssh` client.

For what paramiko cannot do (2FA and keyboard-interactive bastions,
Kerberos/GSSAPI, FIDO `sk-` keys, host CAs, anything else in the user's
ssh_config): one ControlMaster per node per scope authenticates once, in the
foreground, exactly as `ssh NODE` in the user's terminal would; every session
is then `ssh -o ControlMaster=no` over that master, so it costs a local process
and a channel, never another login.

Lifetime of a master: it is started with `-f` (background once authenticated)
and ControlPersist, and each transport holds it with an idle mux client
(`ssh -O proxy`) for as long as the transport is open, so the master never
times out between sessions however long the transport sits idle. After the
last holder lets go (close(), or the controller dies and the holder reads EOF)
the master exits ControlPersist seconds later: RUN_PERSIST for a run's scope
(a detached run's collector takes over the master `up -d` opened),
ONESHOT_PERSIST otherwise, where close() ends it at once with `ssh -O exit`.
The holder also makes alive() free: it exits the moment the master does.

Exit codes: a session's wait() returns ssh's exit status, which is the remote
command's, except that 255 is also what ssh returns when the remote command
was killed by a signal or when ssh itself failed (the connection dropped).
Callers that must tell these apart ask alive(), as remote.RemoteJob does.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable

from ..errors import UnreachableError
from ..login import for_any_shell
from .local import LocalProcess

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# Control sockets live here; OpenSSH appends ~17 characters while creating one,
# and a Unix socket path is limited to ~104 bytes, so the path stays short.
CONTROL_DIR = "/tmp/clusterrun-cm-{uid}"
RUN_PERSIST = 60        # seconds a run's master outlives its last holder
ONESHOT_PERSIST = 10    # same for exec/check, if the controller died before close()
KEEPALIVE = 15          # ServerAliveInterval: a dead link ends the master (~3 missed)
# Extra time for the master beyond ConnectTimeout: ssh's ConnectTimeout covers the
# TCP connect and key exchange, not authentication. On a terminal a person may be
# typing a password or a 2FA code; without one nothing can be asked.
AUTH_GRACE_TTY = 120.0
AUTH_GRACE = 5.0
DEFAULT_TIMEOUT = 10.0
READ = 65536

_lock = threading.Lock()
_path_locks: dict[str, threading.Lock] = {}
_holders: dict[str, int] = {}       # control path -> open transports in this process


def _ssh(name: str) -> str:
    ssh = shutil.which("ssh")       # at call time: PATH may differ between calls
    if ssh is None:
        raise UnreachableError(f"{name}: transport openssh needs an OpenSSH client, and no `ssh` is on PATH")
    return ssh


def control_dir() -> str:
    """The private directory for control sockets, created 0700; refused if anyone else could use it."""
    uid = os.getuid()
    path = CONTROL_DIR.format(uid=uid)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UnreachableError(f"cannot create {path} for ssh's control sockets: {e.strerror or e}") from None
    st = os.lstat(path)
    # Whoever can write there could put a socket of theirs where ours would be.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise UnreachableError(
            f"{path} (for ssh's control sockets) is not a directory private to you "
            f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); remove it and try again")
    return path


def control_path(scope: str, target: str, user: str | None, port: int | None) -> str:
    """The ControlPath of one node's master in one scope (a run, or one exec/check)."""
    key = "\0".join((scope, target, user or "", "" if port is None else str(port)))
    return os.path.join(control_dir(), hashlib.sha256(key.encode()).hexdigest()[:20])


def _has_tty() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        return True
    except OSError:
        return False


def _last_lines(text: str, n: int = 2) -> str:
    """ssh's own message: its last lines, without debug chatter a LogLevel may add."""
    lines = [ln.strip() for ln in text.replace("\r", "").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("debug")]
    return " ".join(lines[-n:])


# --- a session -----------------------------------------------------------------

class _Pipe(io.RawIOBase):
    """The read end of a session's stdout pipe; reads honour a timeout like a socket's."""

    def __init__(self, fd: int, on_timeout: Callable[[], None]) -> None:
        self._fd = fd
        self._on_timeout = on_timeout
        self.timeout: float | None = None
        self._poll = select.poll()      # not select(): fds above 1023 at hundreds of nodes
        self._poll.register(fd, select.POLLIN)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, b: WriteableBuffer) -> int:
        if self.timeout is not None and not self._poll.poll(self.timeout * 1000):
            self._on_timeout()
            raise socket.timeout(f"no output for {self.timeout:g}s")
        return os.readv(self._fd, [b])

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class OpenSSHProcess(LocalProcess):
    """One `ssh` session process: a local process whose reads can time out."""

    def __init__(self, argv: list[str], merge_stderr: bool = False,
                 on_stall: Callable[[], None] = lambda: None,
                 link_up: Callable[[], bool] = lambda: True) -> None:
        self._link_up = link_up
        self._err = tempfile.TemporaryFile()
        r, w = os.pipe()
        try:
            # A session of its own: a Ctrl-C on the terminal reaches the controller
            # only, which then tears the job down in order.
            self._p = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=w,
                stderr=subprocess.STDOUT if merge_stderr else self._err, start_new_session=True)
        except BaseException:
            os.close(r)
            self._err.close()
            raise
        finally:
            os.close(w)
        self._pipe = _Pipe(r, on_stall)
        self.stdout = io.BufferedReader(self._pipe, READ)

    def wait(self, timeout: float | None = None) -> int | None:
        """The session's exit status. ssh says 255 both for its own failure and for a
        remote command killed by a signal, and a session can end a moment before the
        end of its connection shows: after a 255, give that moment (at most 2 s) so
        that the transport's alive() then tells the two apart."""
        code = super().wait(timeout)
        if code == 255:
            deadline = time.monotonic() + 2.0
            while self._link_up() and time.monotonic() < deadline:
                time.sleep(0.05)
        return code

    def set_read_timeout(self, seconds: float | None) -> None:
        """Reads (read_some and .stdout) raise socket.timeout after this long without a byte."""
        self._pipe.timeout = seconds

    def end(self) -> None:
        """End the session (the master then closes its channel); a reader sees EOF."""
        if self._p.poll() is None:
            self._p.kill()
            self._p.wait()

    def close(self) -> None:
        self.end()
        self.close_stdin()
        self.stdout.close()
        self._err.close()


# --- a node ----------------------------------------------------------------------

class OpenSSHTransport:
    """One node through the system ssh client, over a ControlMaster this transport holds.

    `persist` (a run's scope) makes the master wait RUN_PERSIST seconds after its
    last holder instead of ONESHOT_PERSIST. close(linger=True) leaves it to whoever
    takes the scope over (a detached run's collector); close() ends it once no
    transport of this process holds it.
    """

    def __init__(self, name: str, ssh: str, path: str, target: str, common: list[str],
                 persist: bool, holder: subprocess.Popen, timeout: float, owns: bool = True) -> None:
        self.name = name
        self._owns = owns               # close() may end the master
        self._ssh = ssh
        self.control_path = path
        self._target = target
        self._common = common           # ControlPath, -l, -p: for every ssh we run
        self.persist = persist
        self._holder = holder
        self._timeout = timeout
        self._peer: str | None = None
        self._peer_lock = threading.Lock()
        self._stalled = False
        self._closed = False
        self._sessions: weakref.WeakSet[OpenSSHProcess] = weakref.WeakSet()

    @property
    def peer_addr(self) -> str:
        """The address sshd saw us connect to (right behind ProxyJump too); one session, on first use."""
        with self._peer_lock:
            if self._peer is None:
                self._peer = self._learn_peer()
            return self._peer

    def _learn_peer(self) -> str:
        # A line of our own (after a newline that ends a login line left open), so
        # that nothing a login script prints can be taken for it.
        proc = self.exec(for_any_shell('echo; echo "CLUSTERRUN-PEER $SSH_CONNECTION"'))
        try:
            proc.close_stdin()
            proc.set_read_timeout(self._timeout + 30)   # the user's login scripts run first
            out = proc.stdout.read()
            proc.wait(5)
        except socket.timeout:
            out = b""
        finally:
            proc.close()
        # "CLUSTERRUN-PEER client port server port"
        for line in reversed(out.decode("utf-8", "replace").splitlines()):
            fields = line.split()
            if len(fields) == 5 and fields[0] == "CLUSTERRUN-PEER":
                return fields[3]
        raise UnreachableError(f"{self.name}: cannot tell which address ssh reached "
                               f"(no SSH_CONNECTION in the node's login shell: {out[-200:]!r})")

    def exec(self, command: str, merge_stderr: bool = False) -> OpenSSHProcess:
        # Without its master, ssh would quietly open a connection of its own.
        if self._closed or not self.alive():
            raise UnreachableError(f"{self.name}: the SSH connection was lost")
        # No tty, no escape character (stdin carries data), never a prompt, none of
        # ssh's chatter in the output, and our command even if ssh_config has a RemoteCommand.
        argv = [self._ssh, "-T", "-e", "none", "-o", "ControlMaster=no", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "RemoteCommand=none", *self._common,
                "--", self._target, command]
        proc = OpenSSHProcess(argv, merge_stderr, self._on_stall, self.alive)
        self._sessions.add(proc)
        return proc

    def _on_stall(self) -> None:
        # A session went silent: the link may be dead while the master still
        # answers locally. A reconnect must not reuse it, so close() ends it.
        self._stalled = True

    def alive(self) -> bool:
        return self._holder.poll() is None

    def close(self, linger: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        # As a closed paramiko connection ends its channels: a session left
        # running would go on streaming to a reader that has let go.
        for proc in list(self._sessions):
            proc.end()
        _release(self._holder)
        with _lock:
            _holders[self.control_path] -= 1
            last = _holders[self.control_path] == 0
        if self._stalled or (last and self._owns and not (linger and self.persist)):
            _control(self._ssh, "exit", self._common, self._target)


def _control(ssh: str, op: str, common: list[str], target: str) -> bool:
    """`ssh -O op`: check or exit a master; True if it answered."""
    try:
        return subprocess.run([ssh, "-O", op, *common, "--", target], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _hold(ssh: str, common: list[str], target: str) -> subprocess.Popen:
    """An idle mux client on the master: it keeps ControlPersist from counting, and exits with the master."""
    return subprocess.Popen([ssh, "-N", "-T", "-O", "proxy", "-o", "LogLevel=QUIET", *common, "--", target],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _release(holder: subprocess.Popen) -> None:
    # Not by closing its stdin (how it goes if we die): it then lingers ~0.1 s.
    holder.terminate()
    holder.wait()
    assert holder.stdin is not None
    holder.stdin.close()


def _start_master(name: str, ssh: str, path: str, common: list[str], target: str,
                  timeout: float, accept_new: bool, persist: bool) -> None:
    if os.path.lexists(path):           # a dead master's socket: ssh would not multiplex
        os.unlink(path)
    argv = [ssh, "-f", "-N", "-o", "ControlMaster=yes",
            "-o", f"ControlPersist={RUN_PERSIST if persist else ONESHOT_PERSIST}s",
            "-o", f"ConnectTimeout={max(1, math.ceil(timeout))}",
            "-o", f"ServerAliveInterval={KEEPALIVE}"]
    if accept_new:
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
    argv += [*common, "--", target]
    bound = timeout + (AUTH_GRACE_TTY if _has_tty() else AUTH_GRACE)
    # stderr to a file: -f returns once authenticated, and a pipe's end could
    # stay with the master in the background. Not a session of its own: ssh may
    # ask for a password or a code on the terminal.
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            code = p.wait(bound)
        except subprocess.TimeoutExpired:
            p.terminate()               # lets ssh end its ProxyCommand too
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            raise UnreachableError(f"{name}: ssh {target} did not connect within {bound:g}s") from None
        err.seek(0)
        said = err.read().decode("utf-8", "replace")
        message = _last_lines(said)
    if code != 0:
        lower = message.lower()
        if "has changed" in lower or "identification has changed" in lower:
            # ssh's warning names the file and the host: "ssh-keygen -f FILE -R HOST"
            remove = next((ln.strip() for ln in said.splitlines() if ln.strip().startswith("ssh-keygen ")),
                          f"ssh-keygen -R {target}")
            message = (f"the host key has CHANGED since it was recorded; refusing to connect (it may "
                       f"be a different machine, or an attack). ssh says: {message} If the change is "
                       f"expected, remove the old key: {remove}")
        elif ("host key is known" in lower or "verification failed" in lower) and not any(
                w in lower for w in ("changed", "revoked", "mismatch", "certificate")):
            # ssh says only "Host key verification failed." when it cannot ask
            message = (f"unknown host key ({message}). Trust it with --accept-new-host-keys, or "
                       f"`ssh {target}` once, or `StrictHostKeyChecking accept-new` in ~/.ssh/config")
        raise UnreachableError(f"{name}: {message or f'ssh {target} exited with code {code}'}")
    if not os.path.exists(path):
        raise UnreachableError(f"{name}: ssh connected but made no control socket at {path}"
                               + (f": {message}" if message else ""))


def connect_openssh(name: str, target: str, *, user: str | None, port: int | None,
                    identity_file: str | None, timeout: float | None, accept_new: bool,
                    scope: str, persist: bool, visiting: bool = False) -> OpenSSHTransport:
    """Reach a node through the system ssh: reuse its master in this scope, or authenticate one.

    name: the node's name, first in every error; target: the ssh target as
    written; user/port/identity_file: the hosts file's overrides (-l/-p/-i);
    timeout: ConnectTimeout (None: the ssh config's, else DEFAULT_TIMEOUT, as
    on the paramiko stack); scope: masters are shared within a scope (a run id,
    or one per exec/check); persist: the master outlives close() by RUN_PERSIST
    seconds, for whoever takes the scope over next; visiting: a command that only
    looks in on a run (`stacks`) never ends a master it found (the collector's).
    """
    ssh = _ssh(name)
    from .sshconfig import resolve
    resolved = resolve(target, user=user, port=port, identity_file=identity_file, node=name)
    if timeout is None:
        timeout = resolved.connect_timeout or DEFAULT_TIMEOUT
    # A changed host key is refused whatever the ssh config says, as on paramiko:
    # `StrictHostKeyChecking no` would let ssh log in with public keys after its
    # warning. accept-new still records unknown keys, as `no` does.
    accept_new = accept_new or resolved.strict_host_key_checking == "no"
    try:
        path = control_path(scope, target, user, port)
    except UnreachableError as e:
        raise UnreachableError(f"{name}: {e}") from None
    # Every ssh we run names the master's socket, and the user and port, so that
    # `Match user` and the like in ssh_config see what the master saw. Only the
    # master authenticates, so only it gets -i (ssh warns on each run if the file is missing).
    common = ["-o", f"ControlPath={path}"]
    if user:
        common += ["-l", user]
    if port:
        common += ["-p", str(port)]
    ident = ["-i", os.path.expanduser(identity_file)] if identity_file else []
    with _lock:
        path_lock = _path_locks.setdefault(path, threading.Lock())
    with path_lock:                     # two masters on one path: the second would not multiplex
        found = _control(ssh, "check", common, target)
        if not found:
            _start_master(name, ssh, path, common + ident, target, timeout, accept_new, persist)
        holder = _hold(ssh, common, target)
        with _lock:
            _holders[path] = _holders.get(path, 0) + 1
    return OpenSSHTransport(name, ssh, path, target, common, persist, holder, timeout,
                            owns=not (visiting and found))
