"""Remote job: one node's part of a run, driven over its transport.

The node runs clusterrun/nodeagent.py (shipped inline as `python -c`), which
starts torchrun in its own session and streams its files back in frames; this
module renders that command from the plan and reads the frames.
"""

from __future__ import annotations

import base64
import json
import shlex
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .plan import NodePlan, quote_path, shell_prefix
from .stream import NodeOutput
from .transport import Process, Transport

_AGENT = zlib.compress((Path(__file__).parent / "nodeagent.py").read_bytes(), 9)
_BOOT = "import base64,zlib;exec(zlib.decompress(base64.b64decode(%r)))" % base64.b64encode(_AGENT).decode()


def agent_command(node: NodePlan, spec: dict[str, Any]) -> str:
    """The shell line that runs the node agent: cd, setup, then exec python."""
    spec = {"job_dir": node.job_dir, **spec}
    return (
        shell_prefix(node)
        + f"exec {quote_path(node.python)} -c {shlex.quote(_BOOT)} {shlex.quote(json.dumps(spec))}"
    )


@dataclass(frozen=True)
class RankFailure:
    rank: int
    local_rank: int
    exitcode: int


@dataclass
class NodeResult:
    """How one node's job ended."""

    node: NodePlan
    state: str                  # exited | lost | failed-to-start
    code: int | None = None     # torchrun's exit code
    failures: list[RankFailure] = field(default_factory=list)
    message: str = ""
    stopped: bool = False       # we stopped it (fail fast, Ctrl-C)

    @property
    def ok(self) -> bool:
        return self.state == "exited" and self.code == 0


class RemoteJob:
    """Start one node's job and stream it until it ends."""

    def __init__(self, node: NodePlan, transport: Transport, output: NodeOutput,
                 master_addr: str, on_started: Callable[[NodePlan, dict], None]) -> None:
        self.node = node
        self.transport = transport
        self.output = output
        self.master_addr = master_addr
        self.on_started = on_started
        self.stopped = False
        self._stop_lock = threading.Lock()

    def start_spec(self) -> dict[str, Any]:
        n = self.node
        return {"mode": "start", "argv": list(n.argv), "env": dict(n.env), "python": n.python,
                "pick_ifname": list(n.pick_ifname), "master_addr": self.master_addr}

    def run(self) -> NodeResult:
        proc = self.transport.exec(agent_command(self.node, self.start_spec()))
        try:
            result = self._read(proc)
        finally:
            proc.close()
        result.stopped = self.stopped
        return result

    def _read(self, proc: Process) -> NodeResult:
        out, data = proc.stdout, self.output.data
        readline, read = out.readline, out.read
        while True:
            header = readline()
            if header[:2] == b"D ":
                _, key, n = header.split(b" ")
                data(key.decode(), read(int(n)))
            elif header[:2] == b"S ":
                ev = json.loads(header[2:])
                name = ev.pop("event")
                if name == "started":
                    self.on_started(self.node, ev)
                    continue
                proc.send(b"rm\n")          # every byte is in our logs: the node may clean up
                proc.wait(timeout=10)
                if name == "exit":
                    return NodeResult(self.node, "exited", ev["code"],
                                      [RankFailure(**f) for f in ev.get("failures", [])])
                return NodeResult(self.node, name, None, message=ev.get("reason", ""))
            elif header:                    # e.g. a login script printing: show it, untagged by rank
                data("L", header if header.endswith(b"\n") else header + b"\n")
            else:
                code = proc.wait()
                err = proc.stderr_text().strip()
                return NodeResult(self.node, "failed-to-start", code,
                                  message=err or f"the node agent exited with code {code}")

    def stop(self, grace: float = 5.0) -> dict[str, Any]:
        """TERM, then KILL after grace, every process of this node's job."""
        with self._stop_lock:
            self.stopped = True
        spec = {"mode": "kill", "marker": self.node.marker, "grace": grace}
        proc = self.transport.exec(agent_command(self.node, spec))
        try:
            line = proc.stdout.readline()
            proc.wait()
        finally:
            proc.close()
        if line.startswith(b"S "):
            return json.loads(line[2:])
        return {"event": "error", "message": line.decode("utf-8", "replace")}
