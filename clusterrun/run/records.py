"""The run records: what a run's directory keeps about it, typed.

    state.json     {node_rank: NodeRecord}   each node's state, kept by the run's collector
    attempts.json  [AttemptRecord]           where each attempt's lines start (up --max-restarts)
    hang.json      HangRecord                the last hang the run's watch diagnosed
    submission.json  Submission              a run submitted with sbatch: its Slurm job
    batch.json     BatchEnd                  how that job's batch step (the controller) ended

Each record reads the files every clusterrun version wrote (the same keys; a key
an older version did not write takes its default), so that old runs still show in
`ps`, `status` and `logs`. Only the runs registry (runs.py) reads and writes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..model import FINAL_STATES, NodeState, RankFailure


@dataclass(frozen=True)
class NodeRecord:
    """One node's entry in state.json: its state and what it ended with."""

    node: str                       # the node's name (a spare's, where one stands in)
    state: NodeState
    time: float | None = None       # when it was recorded (the first versions did not say)
    code: int | None = None         # torchrun's exit code, once it exited
    message: str = ""               # why it was lost, killed or did not start
    stopped: bool = False           # our stop reached its job before it ended
    failures: list[RankFailure] = field(default_factory=list)
    pgid: int | None = None         # the job's process group on the node, once running
    ifname: str | None = None       # the interface the node chose to reach MASTER_ADDR

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "state": self.state.value, "code": self.code, "message": self.message,
                "stopped": self.stopped, "failures": [dataclasses.asdict(f) for f in self.failures],
                "pgid": self.pgid, "ifname": self.ifname, "time": self.time}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "NodeRecord":
        return cls(node=d.get("node", ""), state=NodeState(d["state"]), time=d.get("time"),
                   code=d.get("code"), message=d.get("message") or "", stopped=bool(d.get("stopped")),
                   failures=[_failure(f) for f in d.get("failures") or []],
                   pgid=d.get("pgid"), ifname=d.get("ifname"))


def has_ended(record: NodeRecord | None) -> bool:
    """Whether a node's end is recorded (a node with no record has not even started)."""
    return record is not None and record.state in FINAL_STATES


def _failure(d: dict[str, Any]) -> RankFailure:
    # By RankFailure's own fields, so that a fact added to it is kept without a change
    # here; a fact an older version did not record takes its default.
    return RankFailure(**{f.name: d[f.name] for f in dataclasses.fields(RankFailure) if f.name in d})


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt of a run that may restart: where its bytes start in every log."""

    attempt: int
    time: float
    max_restarts: int
    starts: dict[str, int]          # log file name -> its size when the attempt began
    nodes: list[str]                # who ran it, in node_rank order
    replaced: dict[str, str] = field(default_factory=dict)     # spare's name -> the node's

    def to_json(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "time": self.time, "max_restarts": self.max_restarts,
                "starts": dict(self.starts), "nodes": list(self.nodes), "replaced": dict(self.replaced)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "AttemptRecord":
        return cls(attempt=d["attempt"], time=d.get("time", 0.0), max_restarts=d.get("max_restarts", 0),
                   starts=dict(d.get("starts") or {}), nodes=list(d.get("nodes") or []),
                   replaced=dict(d.get("replaced") or {}))


@dataclass(frozen=True)
class HangRecord:
    """A hang the watch found: what it concluded and where the stacks are kept."""

    time: float
    diagnosis: str
    stacks: str                     # the saved stacks' path

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "diagnosis": self.diagnosis, "stacks": self.stacks}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HangRecord":
        return cls(time=d["time"], diagnosis=d["diagnosis"], stacks=d["stacks"])


@dataclass(frozen=True)
class Submission:
    """A run `up` submitted with sbatch (outside an allocation): its Slurm job, which
    clusterrun may cancel, and what `ps` shows before the run has a plan."""

    job: str                        # the Slurm job id sbatch gave
    time: float                     # when it was submitted
    hosts: str                      # HOSTS as typed
    script: list[str]               # SCRIPT and its arguments

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "time": self.time, "hosts": self.hosts, "script": list(self.script)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Submission":
        return cls(job=str(d["job"]), time=d.get("time", 0.0), hosts=d.get("hosts", ""),
                   script=list(d.get("script") or []))


@dataclass(frozen=True)
class BatchEnd:
    """How a submitted run's controller (its job's batch step) ended: its exit code and,
    when it ended with an error of its own, that error's words."""

    code: int
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BatchEnd":
        return cls(code=int(d["code"]), message=d.get("message") or "")
