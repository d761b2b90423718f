"""Helpers shared by the end-to-end tests: one kit, so that no test file imports another.

- files and hosts files: `write`, `hosts_file` (each call its own `master_port`, from 29610);
- running clusterrun: `up` (one `clusterrun up`, waited for), `Controller` (commands as a user
  in a shell would run them, all with one CLUSTERRUN_HOME), `Running` (a started command whose
  output is read as it comes), `read_until` (pty masters read until a condition);
- the workers: `REPORT` (each rank prints its own rank, local rank, hostname, interface and
  arguments as JSON), `TICKER` (each rank prints `tick R I` n times); reading their lines:
  `TAG`, `reports`, `check_tags`, `tagged_ticks`;
- `assert_nothing_left`: no process of ours on any node.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

_ports = itertools.count(29610)

# A test of a lost node waits this long (CLUSTERRUN_RECONNECT_WINDOW, a hidden setting the CLI
# reads), not the user's 60 s: a machine gone for good is lost just as it would be, sooner.
SHORT_RECONNECT_WINDOW = 5


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def hosts_file(tmp_path: Path, entries: list, filename: str = "hosts.yaml", **top) -> Path:
    import yaml

    data = {"master_port": next(_ports), **top, "hosts": entries}
    p = tmp_path / filename
    p.write_text(yaml.safe_dump(data))
    return p


def up(cluster, tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "crhome"
    return subprocess.run(
        [sys.executable, "-m", "clusterrun", "up", *args],
        env=cluster.env(clusterrun_home=home), cwd=tmp_path,
        capture_output=True, text=True, timeout=timeout,
    )


def assert_nothing_left(cluster) -> None:
    """No process of ours on any node (sshd's own session processes get a moment to exit)."""
    left = cluster.wait_no_leftovers(timeout=10)
    assert not left, {n: cluster.describe_pids(p) for n, p in left.items()}


REPORT = """\
    import json, os, socket, sys
    import torch.distributed as dist
    dist.init_process_group("gloo")
    print("REPORT " + json.dumps({
        "rank": dist.get_rank(), "world": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]), "hostname": socket.gethostname(),
        "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "args": sys.argv[1:],
    }))
    dist.barrier()
"""

TAG = re.compile(r"^\[(?P<node>[^ \]]+) g(?P<g>\d+) l(?P<l>\d+)\] (?P<text>.*)$")


def reports(stdout: str) -> list[tuple[dict, dict]]:
    """(tag fields, worker's own report) for every REPORT line."""
    out = []
    for line in stdout.splitlines():
        m = TAG.match(line)
        if m and m["text"].startswith("REPORT "):
            out.append((m.groupdict(), json.loads(m["text"][len("REPORT "):])))
    return out


def check_tags(stdout: str, nodes: list[str], nprocs: list[int]) -> None:
    got = reports(stdout)
    world = sum(nprocs)
    assert len(got) == world, stdout
    assert sorted(r["rank"] for _, r in got) == list(range(world))
    starts = list(itertools.accumulate([0] + nprocs[:-1]))
    for tag, r in got:
        # The tag says what the worker itself says: global rank, local rank, machine.
        assert int(tag["g"]) == r["rank"]
        assert int(tag["l"]) == r["local_rank"]
        assert tag["node"] == r["hostname"]           # node names are the hosts' hostnames here
        assert r["world"] == world
        node_rank = nodes.index(tag["node"])
        assert r["rank"] == starts[node_rank] + r["local_rank"]
        assert r["ifname"] == "eth0"                  # gloo bound to the cluster network


TICKER = """\
    import os, sys, time
    rank = os.environ["RANK"]
    n, dt = int(sys.argv[1]), float(sys.argv[2])
    for i in range(n):
        print(f"tick {rank} {i}", flush=True)
        time.sleep(dt)
    print(f"done {rank}", flush=True)
"""


class Running:
    """A clusterrun process whose output is read as it comes, with bounded waits."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._cv = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(f, buf), daemon=True)
                         for f, buf in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _read(self, f, buf: list[str]) -> None:
        for line in f:
            with self._cv:
                buf.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, needle: str, timeout: float = 120) -> None:
        """Until a stdout line contains needle (fails the test on timeout or exit)."""
        with self._cv:
            self._cv.wait_for(lambda: any(needle in l for l in self.out) or self.proc.poll() is not None,
                              timeout)
            assert any(needle in l for l in self.out), f"no {needle!r} in output:\n{''.join(self.err)}"

    def finish(self, timeout: float = 120) -> tuple[str, str]:
        """Wait for the exit; (stdout, stderr). Kills the process if it overstays."""
        try:
            self.proc.wait(timeout)
        finally:
            self.proc.kill()
            for t in self._readers:
                t.join(10)
        return "".join(self.out), "".join(self.err)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


class Controller:
    """Runs clusterrun commands the way a user in a shell would, all sharing one CLUSTERRUN_HOME."""

    def __init__(self, cluster, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.env = cluster.env(clusterrun_home=tmp_path / "crhome")

    def short_reconnect_window(self) -> int:
        """From now on, a node unreachable for SHORT_RECONNECT_WINDOW seconds is lost (not 60)."""
        self.env["CLUSTERRUN_RECONNECT_WINDOW"] = str(SHORT_RECONNECT_WINDOW)
        return SHORT_RECONNECT_WINDOW

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "clusterrun", *args]

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env, cwd=self.tmp, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, *args: str) -> Running:
        return Running(subprocess.Popen(self.argv(*args), env=self.env, cwd=self.tmp, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    def ticker(self, cluster, nodes: int, n: int, dt: float, nproc: int = 1) -> Running:
        """`up` of TICKER on the first `nodes` nodes: each rank prints `tick R I` n times."""
        script = write(self.tmp / "ticker.py", TICKER)
        hosts = hosts_file(self.tmp, cluster.names[:nodes], nproc_per_node=nproc)
        return self.start("up", str(hosts), str(script), str(n), str(dt))

    def abandoned_run(self, cluster, after: str) -> None:
        """A run whose `up` is SIGKILLed once `after` was printed: nobody collects it."""
        p = self.ticker(cluster, 2, 100000, 0.05)
        p.wait_for(after)
        p.proc.kill()
        p.finish()

    def status(self, run: str | None = None) -> dict:
        r = self.run("status", *([run] if run else []), "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_for(self, pred, what: str, timeout: float = 120) -> None:
        """Poll (bounded) until pred() is true."""
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.3)

    def rank_log(self, run: str, rank: int) -> list[str]:
        path = self.tmp / "crhome" / "runs" / run / "logs" / f"rank{rank}.log"
        return path.read_text().splitlines() if path.exists() else []


def tagged_ticks(stdout: str, rank: int) -> list[int]:
    pat = re.compile(rf"^\[\S+ g{rank} l\d\] tick {rank} (\d+)$", re.M)
    return [int(m) for m in pat.findall(stdout)]


def read_until(fds: dict[int, bytearray], done, timeout: float) -> None:
    """Read the pty masters into their buffers until done() or the timeout."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        ready, _, _ = select.select(list(fds), [], [], 0.5)
        for fd in ready:
            try:
                fds[fd] += os.read(fd, 65536)
            except OSError:         # EIO: the shell and everything on that terminal ended
                pass
