"""The model: the states a node and a run can be in, and how a node's job ended.

Every view (status, ps, the summary, state.json) reads the names from here, so
that a state can never be mistyped. The enums are strings: state.json keeps the
plain words, and a word read back compares equal to its member.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .plan import NodePlan


class _Word(str, enum.Enum):
    def __str__(self) -> str:           # the word itself, in messages and f-strings
        return self.value

    def __format__(self, spec: str) -> str:   # the word, padded as asked: f"{state:<14}"
        return format(self.value, spec)


class NodeState(_Word):
    """One node's job, as `status` shows it."""

    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"                   # torchrun ended, with the code recorded
    KILLED = "killed"                   # stopped on purpose: kill, Ctrl-C, fail fast
    LOST = "lost"                       # unreachable, or the agent said the job is gone
    FAILED_TO_START = "failed-to-start"
    NOT_STARTED = "not-started"         # the preflight said no


FINAL_STATES = frozenset({NodeState.EXITED, NodeState.KILLED, NodeState.LOST,
                          NodeState.FAILED_TO_START, NodeState.NOT_STARTED})


class RunState(_Word):
    """A whole run, as `status` and `ps` show it (from its nodes' states)."""

    PENDING = "pending"                 # submitted: its Slurm job waits for nodes
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"


@dataclass(frozen=True)
class RankFailure:
    """A rank that did not exit 0, as its node recorded it."""

    rank: int
    local_rank: int
    exitcode: int | None            # negative: killed by that signal; None: not known
    exit_time: float | None = None  # the node's clock (time.time()) when it ended
    stopped: bool = False           # clusterrun's stop had reached the node by then
    oom: bool = False               # SIGKILLed by the node kernel's OOM killer
    finished: bool = False          # its script was over: it died while Python shut down
    raised: str = ""                # the exception its script raised and did not catch (its type's name)


@dataclass
class NodeResult:
    """How one node's job ended."""

    node: NodePlan
    state: NodeState
    code: int | None = None     # torchrun's exit code
    failures: list[RankFailure] = field(default_factory=list)
    message: str = ""
    stopped: bool = False       # our stop reached its job before it ended (fail fast, Ctrl-C)

    @property
    def ok(self) -> bool:
        return self.state == NodeState.EXITED and self.code == 0
