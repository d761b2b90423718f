"""`clusterrun exec`: one command on every node in parallel, lines tagged `[node]`."""

from __future__ import annotations

import shlex
import threading
from typing import Sequence

from .errors import EXIT_JOB_FAILED, UsageError
from .hostsfile import Host, load_hosts
from .plan import quote_path
from .stream import Terminal, tag_for, tag_lines
from .transport import Transport, connect_all

READ = 65536


def exec_command(host: Host, argv: Sequence[str]) -> str:
    """The shell line for a node: its workdir, setup and env, then argv quoted once."""
    parts = []
    if host.workdir:
        parts.append(f"cd {quote_path(host.workdir)}")
    parts.extend(host.setup)
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in host.env.items())
    parts.append(("exec env " + env if env else "exec ") + shlex.join(argv))
    return " && ".join(parts)


def run_exec(hosts_path: str, argv: Sequence[str], color: bool = False, accept_new: bool = False) -> int:
    if not argv:
        raise UsageError("exec needs a command: clusterrun exec HOSTS -- CMD [ARGS...]")
    hosts = load_hosts(hosts_path)
    term = Terminal()
    transports = connect_all(hosts.hosts, hosts.connect_timeout, accept_new)
    codes: list[int | None] = [None] * len(transports)
    palette = (36, 33, 35, 32, 34, 31)

    def one(i: int, host: Host, t: Transport) -> None:
        tag = tag_for(host.name, palette[i % len(palette)] if color else 0)
        proc = t.exec(exec_command(host, argv), merge_stderr=True)
        pending = b""
        while True:
            chunk = proc.read_some(READ)
            if not chunk:
                break
            chunk = pending + chunk
            cut = chunk.rfind(b"\n") + 1
            if cut:
                term.write(tag_lines(tag, chunk[:cut]))
            pending = chunk[cut:]
        if pending:
            term.write(tag_lines(tag, pending + b"\n"))
        codes[i] = proc.wait()
        proc.close()

    threads = [threading.Thread(target=one, args=(i, h, t), daemon=True)
               for i, (h, t) in enumerate(zip(hosts.hosts, transports))]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        for t in transports:
            t.close()
    failed = [(h.name, c) for h, c in zip(hosts.hosts, codes) if c != 0]
    if failed:
        term.message(f"clusterrun: {shlex.join(argv)} failed on {len(failed)} of {len(codes)} nodes: "
                     + ", ".join(f"{n} (exit {c})" for n, c in failed))
        return EXIT_JOB_FAILED
    return 0
