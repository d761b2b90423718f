"""End-to-end: the lines `clusterrun up --dry-run` prints, pasted into shells on the controller,
run the job by hand on the namespace test cluster (real ssh, real torchrun, gloo on CPU).

The lines use the plain `ssh` client with the user's ssh configuration, never clusterrun's
transport, so each test runs once (pinned to one transport value, which they do not use).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kit import read_until

pytestmark = pytest.mark.e2e

REPORT = """\
    import json, os, socket, sys, time
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(t)
    # One write: the ranks of a node share its terminal, and print() writes the newline apart.
    sys.stdout.write("REPORT " + json.dumps({
        "rank": dist.get_rank(), "world": dist.get_world_size(), "sum": int(t.item()),
        "local_rank": int(os.environ["LOCAL_RANK"]), "hostname": socket.gethostname(),
        "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "args": sys.argv[1:],
    }) + "\\n")
    sys.stdout.flush()
    dist.barrier()
    if os.environ.get("HANG"):
        time.sleep(600)     # until Ctrl-C
"""
ARGS = ["--lr", "0.1", "a b", "it's", "$(touch pwned)", "--log-dir=~/x"]


def dry_run_lines(cluster, tmp_path: Path, port: int, env: dict | None = None) -> tuple[list[str], Path]:
    """The per-node lines of `up --dry-run` for 2 cluster nodes x 2 processes."""
    import yaml

    script = tmp_path / "report.py"
    script.write_text(textwrap.dedent(REPORT))
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(yaml.safe_dump({"master_port": port, "nproc_per_node": 2, "env": env or {},
                                     "hosts": cluster.names[:2]}))
    home = tmp_path / "crhome"
    r = subprocess.run([sys.executable, "-m", "clusterrun", "up", "--dry-run", str(hosts), str(script), *ARGS],
                       env=cluster.env(clusterrun_home=home), cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith("#") and line.strip()]
    lines = lines[lines.index(next(l for l in lines if l.startswith("ssh "))):]
    assert len(lines) == 2 and all(l.startswith("ssh -t ") for l in lines), r.stdout
    for line in lines:
        assert "--redirects" not in line and "--log-dir=" not in line.replace("--log-dir=~/x", "")
        assert ".clusterrun" not in line and "CLUSTERRUN_JOB" not in line
    assert not home.exists(), "a dry run writes nothing"
    return lines, home


def node_home(cluster) -> Path:
    """The home directory of the user the nodes log in as (root; the nodes share this filesystem)."""
    r = cluster.ssh(cluster.names[0], 'printf %s "$HOME"', check=True)
    return Path(r.stdout)


def job_dirs(cluster) -> set[str]:
    """The job directories of clusterrun on the nodes."""
    jobs = node_home(cluster) / ".clusterrun" / "jobs"
    return set(os.listdir(jobs)) if jobs.is_dir() else set()


@pytest.fixture(autouse=True)
def torchrun_tmp():
    """torchrun without --log-dir makes its (empty) log directory /tmp/torchelastic_*, as any
    hand-run torchrun does; the nodes share this machine's /tmp: remove what the test made."""
    before = set(Path("/tmp").glob("torchelastic_*"))
    yield
    for path in set(Path("/tmp").glob("torchelastic_*")) - before:
        shutil.rmtree(path, ignore_errors=True)


def reports(text: str) -> list[dict]:
    return [json.loads(line.split("REPORT ", 1)[1]) for line in text.splitlines() if "REPORT {" in line]


def check_reports(cluster, outputs: list[str]) -> None:
    """Node k's shell shows exactly node k's ranks, bound to the cluster network."""
    for node_rank, out in enumerate(outputs):
        got = sorted(reports(out), key=lambda r: r["rank"])
        assert [(r["rank"], r["local_rank"]) for r in got] == [(2 * node_rank, 0), (2 * node_rank + 1, 1)], out
        for r in got:
            assert r["hostname"] == cluster.names[node_rank] and r["world"] == 4 and r["sum"] == 10
            assert r["ifname"] == "eth0", "gloo bound to the cluster network, not 127.0.0.1"
            assert r["args"] == ARGS


def assert_nothing_left(cluster, jobs_before: set[str]) -> None:
    """No process on any node, no clusterrun job directory."""
    left = cluster.wait_no_leftovers(timeout=15)
    assert not left, {n: cluster.describe_pids(p) for n, p in left.items()}
    assert job_dirs(cluster) <= jobs_before, f"job directories left: {job_dirs(cluster) - jobs_before}"


@pytest.mark.transports("paramiko")
def test_pasted_dry_run_lines_run_the_job_by_hand(cluster, tmp_path):
    lines, _ = dry_run_lines(cluster, tmp_path, port=29680)
    jobs_before = job_dirs(cluster)
    env = cluster.env(clusterrun_home=tmp_path / "crhome")
    # Each line in a shell of its own, as in its own terminal (here without one: ssh -t warns).
    shells = [subprocess.Popen(["bash", "-c", line], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
              for line in lines]
    outputs = []
    try:
        for sh in shells:
            out, err = sh.communicate(timeout=180)
            assert sh.returncode == 0, out + err
            outputs.append(out)
    except subprocess.TimeoutExpired:
        # Say what every shell printed, and end what the hand-started torchruns left on the
        # nodes: left running, it would fail every later test's "nothing left".
        for sh in shells:
            if sh.poll() is None:
                os.killpg(sh.pid, signal.SIGKILL)
        said = [sh.communicate() for sh in shells]
        for name in cluster.names:
            for pid in cluster.leftover_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"a pasted line did not end within 180 s: {said}") from None
    finally:
        for sh in shells:
            if sh.poll() is None:
                os.killpg(sh.pid, signal.SIGKILL)
    check_reports(cluster, outputs)
    assert not (tmp_path / "pwned").exists() and not (node_home(cluster) / "pwned").exists()
    assert_nothing_left(cluster, jobs_before)


@pytest.mark.transports("paramiko")
def test_ctrl_c_in_a_pasted_lines_terminal_ends_that_nodes_job(cluster, tmp_path):
    """ssh -t gives the node's command a terminal: Ctrl-C typed in each terminal stops torchrun
    and its workers there, and nothing is left on the nodes."""
    import fcntl
    import termios

    lines, _ = dry_run_lines(cluster, tmp_path, port=29681, env={"HANG": "1"})
    jobs_before = job_dirs(cluster)
    env = cluster.env(clusterrun_home=tmp_path / "crhome")
    masters: dict[int, bytearray] = {}
    shells = []
    try:
        for line in lines:
            master, slave = os.openpty()

            def own_terminal():
                os.setsid()         # a session of its own, whose terminal is this pty (stdin)
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)

            shells.append(subprocess.Popen(["bash", "-c", line], env=env, cwd=tmp_path, stdin=slave,
                                           stdout=slave, stderr=slave, preexec_fn=own_terminal))
            os.close(slave)
            masters[master] = bytearray()
        read_until(masters, lambda: all(len(reports(b.decode(errors="replace"))) == 2 for b in masters.values()),
                   timeout=180)
        outputs = [bytes(b).decode(errors="replace") for b in masters.values()]
        check_reports(cluster, outputs)
        for master in masters:
            os.write(master, b"\x03")           # Ctrl-C, typed in each terminal
        read_until(masters, lambda: all(sh.poll() is not None for sh in shells), timeout=60)
        assert all(sh.poll() is not None for sh in shells), [bytes(b).decode(errors="replace") for b in masters.values()]
        assert all(sh.returncode != 0 for sh in shells)
    finally:
        for sh in shells:
            if sh.poll() is None:
                os.killpg(sh.pid, signal.SIGKILL)
                sh.wait()
        for master in masters:
            os.close(master)
    assert_nothing_left(cluster, jobs_before)
