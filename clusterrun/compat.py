"""Where clusterrun leans on a library's internals, each case in one place.

Every workaround says why it exists, what it saves (measured; docs/performance.md)
and the versions it was checked against. tests/test_compat_unit.py checks each
one against the installed versions and against the oldest paramiko setup.cfg
allows; when a workaround stops applying, that test says which.

paramiko: checked against 3.2.0 (the oldest allowed) and 5.1.0; setup.cfg pins
paramiko>=3.2,<6. CPython: 3.10 to 3.13.
"""

from __future__ import annotations

import functools
import gc
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:           # (at run time paramiko is imported only by import_paramiko)
    import paramiko
    from paramiko.agent import AgentSSH

PARAMIKO_CHECKED = ("3.2.0", "5.1.0")

# --- the cyclic garbage collector during start-up -------------------------------
# Importing click, paramiko and cryptography allocates many objects and frees
# almost none; the collector's passes over them are pure cost. It is off while
# the command starts (__main__), and what start-up built is then frozen out of
# its reach (cli._run): `exec` on one node 0.65-0.78 s before, 0.39-0.53 s after.


def gc_off() -> None:
    gc.disable()


def gc_freeze() -> None:
    """Keep everything allocated so far out of the collector's passes; collect again."""
    gc.freeze()
    gc.enable()


# --- paramiko without invoke ---------------------------------------------------
# paramiko imports invoke (a task runner) only to run `Match exec` lines of its
# own ssh-config reader, which clusterrun never uses (`ssh -G` reads the config).
# invoke is 70 ms of paramiko's 185 ms import (median of 5, python -X importtime).


def import_paramiko() -> Any:
    """paramiko, imported with `import invoke` failing fast (paramiko tolerates that)."""
    if "paramiko" in sys.modules or "invoke" in sys.modules:
        import paramiko
        return paramiko
    sys.modules["invoke"] = None  # type: ignore[assignment]
    try:
        import paramiko
    finally:
        del sys.modules["invoke"]
    return paramiko


# --- paramiko's transport thread, idle ------------------------------------------
# Each connection's thread wakes every Transport._active_check_timeout seconds
# (0.1) to see whether it should stop; clusterrun holds every node's connection
# for the whole run. At 1.0: 64 idle connections cost 0.7% of a core instead of
# 3.2%. Closing does not wait for the wake-up, and keepalives are not affected.
IDLE_WAKEUP_S = 1.0


@functools.lru_cache(maxsize=None)
def quiet_transport() -> type[paramiko.Transport]:
    import_paramiko()
    from paramiko import Transport

    class QuietTransport(Transport):
        _active_check_timeout = IDLE_WAKEUP_S     # __init__: its socket's timeout

    return QuietTransport


# --- an agent on a socket of our choosing ----------------------------------------
# paramiko.Agent only connects to $SSH_AUTH_SOCK; IdentityAgent names any path.
# AgentSSH._connect(sock) is what paramiko.Agent itself calls with its socket.
# (Setting SSH_AUTH_SOCK instead would race between the nodes' threads.)


def agent_on(sock: socket.socket) -> AgentSSH:
    from paramiko.agent import AgentSSH

    agent = AgentSSH()
    agent._connect(sock)  # type: ignore[attr-defined]  # private: types-paramiko leaves it out
    return agent
