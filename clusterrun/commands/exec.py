"""`clusterrun exec`: one command on every node in parallel, lines tagged `[node]`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Sequence

from ..errors import EXIT_JOB_FAILED, UnreachableError, UsageError
from ..hostsfile import Host, load_hosts, with_transport
from ..login import Login
from ..nodeagent import FAILED_MARK
from ..parallel import each
from ..run.stream import Terminal, shown_lines, tag_for, tag_lines
from ..transports.connect import connect_node
from ..transports.base import Transport

READ = 65536


def exec_command(host: Host, argv: Sequence[str]) -> str:
    """The line for a node's login shell (any shell: login.for_any_shell): the login
    line of `up` (its workdir and setup, each failure marked), then its env and argv,
    quoted once."""
    return login_of(host).line(exec_program(host, argv))


def exec_program(host: Host, argv: Sequence[str]) -> str:
    """The command `exec` runs on a node, as sh words: its env, then argv."""
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in host.env.items())
    return ("env " + env if env else "") + shlex.join(argv)


def login_of(host: Host) -> Login:
    """The node's login steps, as `up` runs them before its agent."""
    return Login(host.workdir, host.setup)


@dataclass(frozen=True)
class Ran:
    """How one node's command ended: its exit code (None: no status came back), and why
    it never started if a step of the login line (workdir, setup) failed."""
    code: int | None
    not_started: str | None = None


def run_exec(hosts_path: str, argv: Sequence[str], color: bool = False, accept_new: bool = False,
             transport: str | None = None) -> int:
    """Like pdsh: every node runs the command as soon as it is connected; a node
    that cannot be reached is named at the end (exit 3), the others still ran."""
    if not argv:
        raise UsageError("exec needs a command: clusterrun exec HOSTS -- CMD [ARGS...]")
    hosts = with_transport(load_hosts(hosts_path), transport)
    term = Terminal()
    results: list[Ran | None] = [None] * len(hosts.hosts)
    unreachable: list[str] = []
    palette = (36, 33, 35, 32, 34, 31)

    def one(i: int, host: Host) -> None:
        # Whatever goes wrong on a node is named at the end: a node that did not run
        # the command never counts as a success.
        try:
            t = connect_node(host, hosts.connect_timeout, accept_new)
        except UnreachableError as e:
            unreachable.append(str(e))
            return
        except Exception as e:  # noqa: BLE001
            unreachable.append(f"{host.name}: {type(e).__name__}: {e}")
            return
        try:
            results[i] = run_one(t, exec_command(host, argv), login_of(host), term,
                                 tag_for(host.name, palette[i % len(palette)] if color else 0))
        except Exception as e:  # noqa: BLE001 - e.g. the connection dropped mid-command
            unreachable.append(f"{host.name}: the command did not complete: {e or type(e).__name__}")
        finally:
            t.close()

    each(list(enumerate(hosts.hosts)), lambda ih: one(*ih))
    ran = [(h.name, r) for h, r in zip(hosts.hosts, results) if r is not None]
    not_started = [(name, r.not_started) for name, r in ran if r.not_started is not None]
    codes = [(name, r.code) for name, r in ran if r.not_started is None and r.code is not None]
    failed = [(name, c) for name, c in codes if c != 0]
    # A node with no exit status (the connection ended without one) did not succeed either.
    unreachable += [f"{name}: no exit status came back" for name, r in ran if r.code is None]
    unreachable += [f"{h.name}: no exit status came back" for h, r in zip(hosts.hosts, results)
                    if r is None and not any(u.startswith(h.name + ": ") for u in unreachable)]
    if not_started:     # the workdir or `setup:` failed: told in words, as `up` tells them
        term.message(f"clusterrun: {shlex.join(argv)} did not start on {len(not_started)} of "
                     f"{len(ran)} nodes:\n  " + "\n  ".join(f"{n}: {why}" for n, why in not_started))
    if failed:
        term.message(f"clusterrun: {shlex.join(argv)} failed on {len(failed)} of {len(codes)} nodes: "
                     + ", ".join(f"{n} (exit {c})" for n, c in failed))
    if unreachable:
        raise UnreachableError(unreachable_heading(len(unreachable), len(hosts.hosts))
                               + ":\n  " + "\n  ".join(sorted(unreachable)))
    return EXIT_JOB_FAILED if failed or not_started else 0


def unreachable_heading(missing: int, total: int) -> str:
    """How many nodes did not run the command, in words that fit the count: the others
    ran it only where there are others."""
    if missing < total:
        return f"cannot reach {missing} of {total} nodes (the command ran on the others)"
    if total == 1:
        return "cannot reach the node (the command ran nowhere)"
    return f"cannot reach any of the {total} nodes (the command ran nowhere)"


_MARK = FAILED_MARK.encode()
_KEEP = 8192        # bytes of a node's latest output kept, for the last lines of a failed setup


def run_one(t: Transport, command: str, login: Login, term: Terminal, tag: bytes) -> Ran:
    """Run one node's command, its output tagged line by line (a line redrawn with \\r,
    a progress bar, as its last redraw); how it ended."""
    proc = t.exec(command, merge_stderr=True)
    marks: list[str] = []       # the login line's failure mark, if one of its steps failed
    latest = b""

    def show(lines: bytes) -> None:
        nonlocal latest
        if _MARK in lines:
            lines = _unmarked(lines, marks)
        if lines:
            latest = (latest + lines)[-_KEEP:]
            term.write(tag_lines(tag, shown_lines(lines)))

    pending = b""
    while True:
        chunk = proc.read_some(READ)
        if not chunk:
            break
        chunk = pending + chunk
        cut = chunk.rfind(b"\n") + 1
        if cut:
            show(chunk[:cut])
        pending = chunk[cut:]
    if pending:
        show(pending + b"\n")
    code = proc.wait()
    proc.close()
    if marks and code == 1:     # a failed step exits 1 (the command itself never ran)
        return Ran(code, login.marked_failure(marks, latest.decode("utf-8", "replace").splitlines()))
    return Ran(code)


def _unmarked(lines: bytes, marks: list[str]) -> bytes:
    """The lines without the login line's failure mark, which goes to marks. (A setup
    that left its last line open has the mark at that line's end.)"""
    out = []
    for line in lines.splitlines(keepends=True):
        at = line.find(_MARK)
        if at < 0:
            out.append(line)
            continue
        marks.append(line[at:].decode("utf-8", "replace").strip())
        if line[:at].strip():
            out.append(line[:at] + b"\n")
    return b"".join(out)
