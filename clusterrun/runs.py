"""The runs registry: one private directory per run under $CLUSTERRUN_HOME.

    $CLUSTERRUN_HOME/runs/<run id>/plan.json      what was launched
    $CLUSTERRUN_HOME/runs/<run id>/logs/rank<G>.log   every line of global rank G
    $CLUSTERRUN_HOME/runs/<run id>/logs/node<K>.log   torchrun's own lines on node K
    $CLUSTERRUN_HOME/runs/<run id>/result.json    per-node outcome, once the run ended
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from .plan import Plan


def clusterrun_home() -> Path:
    return Path(os.environ.get("CLUSTERRUN_HOME") or os.path.expanduser("~/.clusterrun"))


def new_run_id() -> str:
    """Sortable by start time, unique across controllers: 20261126-190512-3fa9c1."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, run_id: str) -> "RunDir":
        root = clusterrun_home() / "runs"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root.parent, 0o700)
        path = root / run_id
        path.mkdir(mode=0o700)
        (path / "logs").mkdir(mode=0o700)
        return cls(path)

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def node_log(self, node_rank: int) -> Path:
        return self.logs / f"node{node_rank}.log"

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.path / (name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=_jsonable)
        os.replace(tmp, self.path / name)

    def write_plan(self, plan: Plan) -> None:
        self.write_json("plan.json", dataclasses.asdict(plan))


def _jsonable(o: Any) -> Any:
    if isinstance(o, (range, tuple, set)):
        return list(o)
    return dict(o) if hasattr(o, "items") else str(o)


def tail_lines(path: Path, n: int) -> list[str]:
    """The last n lines of a file, read from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]
