"""What each command was asked, beyond the hosts file: typed, frozen, built once by the CLI.

- LaunchOptions: what `up` runs (the script, its args, overrides of the hosts file);
  `make_plan` turns it into a Plan, and `--dry-run` shows that plan.
- UpOptions: how `up` runs it (fail-fast, detach, preflight, transport).
- WatchOptions: how a run is followed while it runs, by the attached `up`, the
  detached collector, `logs -f`, `status` and `kill` (see run/controller.py).

A variant is made with `dataclasses.replace`, never by copying `__dict__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from .plan import NodePlan

# How long a node whose link dropped may take to answer again before it counts as lost.
RECONNECT_WINDOW = 60.0
# A hidden setting, read once by the CLI (cli.py), not documented for users: the test
# suite shortens the window so that a test of a lost node takes seconds, not a minute.
RECONNECT_WINDOW_ENV = "CLUSTERRUN_RECONNECT_WINDOW"


@dataclass(frozen=True)
class LaunchOptions:
    """What `clusterrun up` was asked to run, beyond the hosts file."""

    script: str
    script_args: tuple[str, ...] = ()
    module: bool = False
    nproc_per_node: int | str | None = None  # overrides every host; "gpu": one per GPU
    master_port: int | str | None = None     # overrides the hosts file
    env: Mapping[str, str] = field(default_factory=dict)  # overrides the hosts file


@dataclass(frozen=True)
class UpOptions:
    """How `clusterrun up` runs it, as opposed to what (LaunchOptions)."""

    fail_fast: bool = True
    accept_new_host_keys: bool = False
    color: bool = False
    kill_grace: float = 5.0
    detach: bool = False
    skip_check: bool = False
    sync: bool = False
    transport: str | None = None        # --transport: every host on it
    hang_timeout: float | None = None   # --hang-timeout (None: the hosts file's)
    on_hang: str | None = None          # --on-hang (None: the hosts file's)
    max_restarts: int | None = None     # --max-restarts (None: the hosts file's)
    restart_delay: float | None = None  # --restart-delay (None: the hosts file's)
    start_timeout: float | None = None  # --start-timeout (None: the hosts file's)
    reconnect_window: float = RECONNECT_WINDOW
    # Submitting to Slurm (outside an allocation; run/submit.py):
    sbatch_args: tuple[str, ...] = ()   # --sbatch-arg, after the hosts file's sbatch_args
    batch_args: tuple[str, ...] = ()    # up's words as typed, less what only the submitting up uses
    run_id: str | None = None           # hidden --run-id: this up is the batch step of that submitted run


@dataclass(frozen=True)
class WatchOptions:
    """How a run's controller follows it: what it prints, when it stops nodes."""

    fail_fast: bool = True
    kill_grace: float = 5.0
    color: bool = False
    print_lines: bool = True                     # show lines on the terminal (False: logs only)
    show: Callable[[NodePlan, str], bool] | None = None   # which node files to show
    connect_timeout: float | None = None    # None: the ssh config's ConnectTimeout, else 10 s
    accept_new_host_keys: bool = False
    interrupt_stops_run: bool = True     # Ctrl-C stops the run (attached up) or just lets go (logs -f)
    report: bool = True                  # print the summary when the run ends
    hang_timeout: float | None = None    # no line this long and no rank working: a hang (hangwatch.py)
    on_hang: str = "report"              # ...and go on waiting, or "kill": end the run
    reconnect_window: float = RECONNECT_WINDOW   # a dropped link: how long until the node is lost

    def quiet(self) -> WatchOptions:
        """Bring the run's record up to date: print nothing, stop nothing (status, kill, logs)."""
        return replace(self, print_lines=False, fail_fast=False, report=False, interrupt_stops_run=False)
