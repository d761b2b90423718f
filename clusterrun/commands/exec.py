"""`clusterrun exec`: one command on every node in parallel, lines tagged `[node]`."""

from __future__ import annotations

import shlex
from typing import Sequence

from ..errors import EXIT_JOB_FAILED, UnreachableError, UsageError
from ..hostsfile import Host, load_hosts, with_transport
from ..parallel import each
from ..plan import quote_path, setup_part
from ..run.stream import Terminal, shown_lines, tag_for, tag_lines
from ..transports.connect import connect_node
from ..transports.base import Transport

READ = 65536


def exec_command(host: Host, argv: Sequence[str]) -> str:
    """The shell line for a node: its workdir, setup and env, then argv quoted once."""
    parts = []
    if host.workdir:
        parts.append(f"cd {quote_path(host.workdir)}")
    parts.extend(setup_part(s) for s in host.setup if s.strip())
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in host.env.items())
    parts.append(("exec env " + env if env else "exec ") + shlex.join(argv))
    return " && ".join(parts)


def run_exec(hosts_path: str, argv: Sequence[str], color: bool = False, accept_new: bool = False,
             transport: str | None = None) -> int:
    """Like pdsh: every node runs the command as soon as it is connected; a node
    that cannot be reached is named at the end (exit 3), the others still ran."""
    if not argv:
        raise UsageError("exec needs a command: clusterrun exec HOSTS -- CMD [ARGS...]")
    hosts = with_transport(load_hosts(hosts_path), transport)
    term = Terminal()
    codes: list[int | None] = [None] * len(hosts.hosts)
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
            codes[i] = run_one(t, exec_command(host, argv), term,
                               tag_for(host.name, palette[i % len(palette)] if color else 0))
        except Exception as e:  # noqa: BLE001 - e.g. the connection dropped mid-command
            unreachable.append(f"{host.name}: the command did not complete: {e or type(e).__name__}")
        finally:
            t.close()

    each(list(enumerate(hosts.hosts)), lambda ih: one(*ih))
    failed = [(h.name, c) for h, c in zip(hosts.hosts, codes) if c is not None and c != 0]
    # A node with no exit status (the connection ended without one) did not succeed either.
    unreachable += [f"{h.name}: no exit status came back" for h, c in zip(hosts.hosts, codes)
                    if c is None and not any(u.startswith(h.name + ": ") for u in unreachable)]
    if failed:
        ran = sum(c is not None for c in codes)
        term.message(f"clusterrun: {shlex.join(argv)} failed on {len(failed)} of {ran} nodes: "
                     + ", ".join(f"{n} (exit {c})" for n, c in failed))
    if unreachable:
        raise UnreachableError(f"cannot reach {len(unreachable)} of {len(codes)} nodes "
                               "(the command ran on the others):\n  " + "\n  ".join(sorted(unreachable)))
    return EXIT_JOB_FAILED if failed else 0


def run_one(t: Transport, command: str, term: Terminal, tag: bytes) -> int | None:
    """Run one node's command, its output tagged line by line (a line redrawn with \\r,
    a progress bar, as its last redraw); its exit code."""
    proc = t.exec(command, merge_stderr=True)
    pending = b""
    while True:
        chunk = proc.read_some(READ)
        if not chunk:
            break
        chunk = pending + chunk
        cut = chunk.rfind(b"\n") + 1
        if cut:
            term.write(tag_lines(tag, shown_lines(chunk[:cut])))
        pending = chunk[cut:]
    if pending:
        term.write(tag_lines(tag, shown_lines(pending + b"\n")))
    code = proc.wait()
    proc.close()
    return code
