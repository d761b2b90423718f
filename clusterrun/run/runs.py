"""The runs registry: one private directory per run under $CLUSTERRUN_HOME.

    runs/<run id>/plan.json        what was launched (the exact plan)
    runs/<run id>/state.json       each node's state, kept by the run's collector
    runs/<run id>/attempts.json    where each attempt's lines start (up --max-restarts)
    runs/<run id>/hang.json        the last hang diagnosed
    runs/<run id>/logs/rank<G>.log every line of global rank G, as printed
    runs/<run id>/logs/node<K>.log torchrun's own lines on node K
    runs/<run id>/result.json      every node's outcome, once the run has ended
    runs/<run id>/collector.lock   held (flock) by the one process streaming the run
    runs/<run id>/control.sock     where that process takes `kill` requests (control.py)
    runs/<run id>/submission.json  a run submitted with sbatch: its Slurm job (run/submit.py)
    runs/<run id>/batch.log        that job's batch step's own words (the controller's stderr)
    runs/<run id>/batch.json       how the batch step ended (its exit code)

Exactly one process at a time, the collector, streams a run from its nodes into
these files: the attached `up`, the background collector of `up --detach`, or a
`logs -f`/`status` that finds nobody collecting (after `up` was killed). The
byte size of each log is where a new collector resumes on the node.

The records (state.json, attempts.json, hang.json) are typed (records.py) and
written only here, each atomically (a new file renamed over the old).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..plan import Plan, masked, plan_from_dict
from .records import AttemptRecord, BatchEnd, HangRecord, NodeRecord, Submission

# A node's thread records its state while others record theirs: each write reads the
# file and replaces one entry, so they take turns (one process writes a run's records:
# its collector, or `kill` once the run has ended).
_state_lock = threading.Lock()


def clusterrun_home() -> Path:
    return Path(os.environ.get("CLUSTERRUN_HOME") or os.path.expanduser("~/.clusterrun"))


def runs_root() -> Path:
    return clusterrun_home() / "runs"


def new_run_id() -> str:
    """Sortable by start time, unique across controllers: 20261126-190512-3fa9c1."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, run_id: str) -> "RunDir":
        root = runs_root()
        # Private where clusterrun makes it; a directory it did not make (a shared
        # CLUSTERRUN_HOME, /tmp) keeps its mode: each run's own directory is 0700.
        for d in (root.parent, root):
            try:
                d.mkdir(parents=True, mode=0o700)
                os.chmod(d, 0o700)          # (mkdir's mode is subject to the umask)
            except FileExistsError:
                pass
        path = root / run_id
        path.mkdir(mode=0o700)
        (path / "logs").mkdir(mode=0o700)
        return cls(path)

    @classmethod
    def find(cls, run_id: str | None) -> "RunDir":
        """The named run, a unique prefix of one, or (None) the latest run."""
        ids = list_run_ids()
        if not ids:
            raise UsageError(f"no runs yet under {runs_root()}")
        if run_id is None:
            return cls(runs_root() / ids[0])
        matches = [i for i in ids if i == run_id] or [i for i in ids if i.startswith(run_id)]
        if len(matches) != 1:
            what = "no run" if not matches else "more than one run"
            raise UsageError(f"{what} matches {run_id!r} (see `clusterrun ps`)")
        return cls(runs_root() / matches[0])

    @classmethod
    def submitted(cls, run_id: str) -> "RunDir":
        """The directory of a run submitted with sbatch, for its batch step to run it in."""
        run = cls(runs_root() / run_id)
        if run.submission() is None:
            raise UsageError(f"run {run_id}: no submitted run of that id under {runs_root()} "
                             "(is CLUSTERRUN_HOME the submitting shell's?)")
        return run

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def node_log(self, node_rank: int) -> Path:
        return self.logs / f"node{node_rank}.log"

    def login_log(self, node_rank: int) -> Path:
        """What node K's login printed before the agent, each time one started."""
        return self.logs / f"node{node_rank}.login.log"

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.path / (name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=_jsonable)
        os.replace(tmp, self.path / name)

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def write_plan(self, plan: Plan) -> None:
        """The plan as run, secrets masked: nothing reads them back, so none is kept at rest."""
        data = dataclasses.asdict(plan)
        for node in data["nodes"]:
            node["env"] = masked(node["env"])
            node["host"]["env"] = masked(node["host"]["env"])
        self.write_json("plan.json", data)

    def plan(self) -> Plan:
        data = self.read_json("plan.json")
        if data is None:
            raise UsageError(f"run {self.run_id}: no readable plan.json in {self.path}")
        return plan_from_dict(data)

    def has_plan(self) -> bool:
        return (self.path / "plan.json").exists()

    def submission(self) -> Submission | None:
        """The Slurm job of a run submitted with sbatch (None: not submitted)."""
        data = self.read_json("submission.json")
        return Submission.from_json(data) if data else None

    def record_submission(self, sub: Submission) -> None:
        self.write_json("submission.json", sub.to_json())

    def record_batch_end(self, end: BatchEnd) -> None:
        self.write_json("batch.json", end.to_json())

    def batch_end(self) -> BatchEnd | None:
        data = self.read_json("batch.json")
        return BatchEnd.from_json(data) if data else None

    @property
    def batch_log(self) -> Path:
        return self.path / "batch.log"

    def discard(self) -> None:
        """Nothing of the run started: remove it, except a submitted run's record of its
        job (what the batch step said stays readable: `status`, the submitting `up`)."""
        if self.submission() is None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for p in self.path.iterdir():
            if p.name not in ("submission.json", "batch.log", "batch.json", "killed"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def node_states(self) -> dict[int, NodeRecord]:
        """Each node's recorded state, by node_rank (a node not yet recorded has none)."""
        return {int(k): NodeRecord.from_json(v) for k, v in (self.read_json("state.json") or {}).items()}

    def set_node_state(self, node_rank: int, record: NodeRecord) -> dict[int, NodeRecord]:
        """Record one node's state (the only writer of state.json); returns every node's."""
        with _state_lock:
            states = self.node_states()
            states[node_rank] = record
            self.write_json("state.json", {str(k): s.to_json() for k, s in sorted(states.items())})
            return states

    def hang(self) -> HangRecord | None:
        data = self.read_json("hang.json")
        return HangRecord.from_json(data) if data else None

    def record_hang(self, hang: HangRecord) -> None:
        self.write_json("hang.json", hang.to_json())

    def ended(self) -> bool:
        return (self.path / "result.json").exists()

    # --- attempts (up --max-restarts): one set of log files, each attempt a slice ---

    def start_attempt(self, plan: Plan, max_restarts: int, replaced: dict[str, str]) -> None:
        """Record where attempt plan.attempt's lines start in every log, and which nodes run it."""
        records = self.attempts()
        starts = {p.name: p.stat().st_size for p in self.logs.iterdir() if p.suffix == ".log"}
        records.append(AttemptRecord(plan.attempt, time.time(), max_restarts, starts,
                                     [n.name for n in plan.nodes], dict(replaced)))
        self.write_json("attempts.json", [r.to_json() for r in records])

    def attempts(self) -> list[AttemptRecord]:
        """Every attempt's record, first to last ([] for a run without restarts)."""
        return [AttemptRecord.from_json(r) for r in self.read_json("attempts.json") or []]

    def attempt_starts(self) -> dict[str, int]:
        """Where the current attempt's bytes start in each log, by file name (none: 0)."""
        records = self.attempts()
        return records[-1].starts if records else {}

    def mark_killed(self, why: str) -> None:
        """Record that the run is being stopped on purpose (kill, Ctrl-C): nodes that end
        from now on without success were killed, not failed."""
        (self.path / "killed").write_text(why)

    def killed_reason(self) -> str | None:
        """What mark_killed recorded, or None."""
        try:
            return (self.path / "killed").read_text().strip()
        except FileNotFoundError:
            return None

    def lock(self) -> "CollectorLock | None":
        """Become this run's collector, or None if another process is it."""
        fd = os.open(self.path / "collector.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return CollectorLock(fd)


class CollectorLock:
    """An flock the kernel drops if the holder dies, even by SIGKILL."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "CollectorLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def list_run_ids() -> list[str]:
    """Run ids, newest first."""
    root = runs_root()
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir()
                   if (p / "plan.json").exists() or (p / "submission.json").exists()), reverse=True)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (range, tuple, set)):
        return list(o)
    return dict(o) if hasattr(o, "items") else str(o)
