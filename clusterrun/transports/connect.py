"""Connecting: one transport per node, chosen by its host entry, all nodes in parallel.

`localhost` nodes run commands as local subprocesses. Every other node is an
ssh target as OpenSSH understands it, reached on one of two stacks (the host's
`transport:`): paramiko (`paramiko.py`, the default: one connection per node,
configured by `ssh -G`), or the system ssh client (`openssh`: one ControlMaster
per node, for what only OpenSSH can do: 2FA prompts, GSSAPI, FIDO keys, host
certificates). A node of a Slurm allocation (HOSTS `slurm`) is reached by
srun (`srun.py`: each session a step of its job). Unknown host keys are refused unless asked to accept new ones; a
changed host key is always refused.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from ..errors import UnreachableError
from ..hostsfile import Host
from ..parallel import each
from .local import LocalTransport
from .base import Transport


def connect_node(host: Host, timeout: float | None, accept_new: bool = False,
                 scope: str | None = None, visiting: bool = False, prove: bool = False) -> Transport:
    """One node's transport: local for localhost, else an SSH connection on the
    host's stack. `scope` is the run it serves (None: this command only); on the
    openssh stack a run's ControlMaster outlives the command, so that a detached
    run's collector and later `logs`/`kill` reuse its authentication (`visiting`: and
    never end the collector's master). `prove`: on Slurm, where no connection is held,
    first start a step there (bounded), so that a node that is gone raises
    UnreachableError (over SSH the connection itself is that proof)."""
    if host.is_local:
        return LocalTransport(host.name)
    if host.transport == "srun":
        from .srun import SrunTransport
        if host.slurm_job is None:
            raise UnreachableError(f"{host.name}: transport srun needs the node's Slurm job")
        srun = SrunTransport(host.host, host.slurm_job, addr=host.addr)
        if prove:
            srun.prove()
        return srun
    if host.transport == "openssh":
        from .openssh import connect_openssh
        return connect_openssh(
            host.name, host.host, user=host.user, port=host.port, identity_file=host.identity_file,
            timeout=timeout, accept_new=accept_new,
            scope=scope or f"pid{os.getpid()}", persist=scope is not None, visiting=visiting)
    from .paramiko import connect
    from .sshconfig import resolve
    target = resolve(host.host, user=host.user, port=host.port, identity_file=host.identity_file,
                     node=host.name)
    return connect(host.name, target, timeout, accept_new)


def connect_each(hosts: Sequence[Host], timeout: float | None, accept_new: bool = False,
                 scope: str | None = None, visiting: bool = False) -> list[tuple[Transport | None, str, float]]:
    """Connect to every node in parallel: (transport or None, error, seconds) per node."""

    def one(host: Host) -> tuple[Transport, float]:
        t0 = time.monotonic()
        return connect_node(host, timeout, accept_new, scope, visiting), time.monotonic() - t0

    out: list[tuple[Transport | None, str, float]] = []
    for host, o in zip(hosts, each(hosts, one)):
        if o.error is None:
            assert o.value is not None
            out.append((o.value[0], "", o.value[1]))
        elif isinstance(o.error, UnreachableError):
            out.append((None, str(o.error), 0.0))
        else:                   # never a traceback, never a silent success
            out.append((None, f"{host.name}: {type(o.error).__name__}: {o.error}", 0.0))
    return out


def connect_all(
    hosts: Sequence[Host], timeout: float | None, accept_new: bool = False,
    consequence: str = "nothing was started", scope: str | None = None, visiting: bool = False,
) -> list[Transport]:
    """Connect to every node in parallel; all or nothing.

    Raises UnreachableError naming every node that failed (and closes the rest),
    so that nothing is started anywhere unless every node is ready.
    """
    results = connect_each(hosts, timeout, accept_new, scope, visiting)
    errors = [err for t, err, _ in results if t is None]
    if errors:
        for t, _, _ in results:
            if t is not None:
                t.close()
        raise UnreachableError(f"cannot reach every node, {consequence}:\n  " + "\n  ".join(errors))
    return [t for t, _, _ in results if t is not None]
