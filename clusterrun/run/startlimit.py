"""The start limit: how long a command waits for a node to log in, run its `setup:` and
answer, and what it says when a node has not by then.

`up` waits up to `start_timeout:` (--start-timeout, 10 minutes by default) for every
node's preflight; `check` has its own limit (--timeout, 2 minutes), `stacks` one of
60 s. A node still waiting when the limit is reached is named with what it was
doing; its setup is ended (remote.Session.end) and nothing of the run is left.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import UnreachableError

CHECK_TIMEOUT = 120.0       # `check`: a node that has not answered by then is reported
STACKS_TIMEOUT = 60.0       # `stacks`: as long as the slowest rank's dump may take, and more


class StartTimeout(UnreachableError):
    """A node had not logged in, run its setup and answered within the start limit (exit 3)."""


def duration(seconds: float) -> str:
    """90 -> 1m30s, 300 -> 5m, 42 -> 42s."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    return f"{m}m{s}s" if s else f"{m}m"


def waiting_text(names: Sequence[str], seconds: float) -> str:
    """The progress line while nodes are still starting."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"waiting {duration(seconds)} for {shown} (logging in or in setup)"


def late_text(doing: str, seconds: float) -> str:
    """What a node was doing when the limit ended it: `in setup for 10m (its setup was ended)`."""
    return f"{doing} for {duration(seconds)}" + (" (its setup was ended)" if doing == "in setup" else "")


def late_lines(late: Sequence[tuple[str, str]], seconds: float) -> list[str]:
    """One line per node the limit ended: `node: in setup for 10m (its setup was ended)`."""
    return [f"{name}: {late_text(doing, seconds)}" for name, doing in late]


def start_timeout_error(late: Sequence[tuple[str, str]], seconds: float) -> StartTimeout:
    """`up` gave up: which nodes were still starting, doing what, and how to wait longer."""
    return StartTimeout(
        f"{len(late)} node{'s' if len(late) != 1 else ''} had not started within the start limit "
        f"({duration(seconds)}); nothing was started:\n  "
        + "\n  ".join(late_lines(late, seconds))
        + "\n(a slower setup: raise the limit with --start-timeout or `start_timeout:` in the hosts file)")
