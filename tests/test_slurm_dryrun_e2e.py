"""End-to-end: the lines `clusterrun up --dry-run` prints inside a Slurm allocation, pasted into
shells of that allocation, run the job by hand on the Slurm test cluster (fixture `slurm`: real
srun steps, real torchrun, gloo on CPU).

The shells have the environment of a real allocation's shell: `salloc` runs a command that
writes its environment to a file and waits; the dry run and every pasted line run with that
environment (plus a variable of this shell's own, which must not reach the ranks). Whatever a
test allocates is cancelled; a hand-started torchrun that hangs ends with its step (its srun
killed, then the job cancelled), so that it cannot fail the tests after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
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
        "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "args": sys.argv[1:], "cwd": os.getcwd(),
        "slurm_conf": os.environ.get("SLURM_CONF"), "mine": os.environ.get("CONTROLLER_ONLY"),
        "lr_env": os.environ.get("LR"),
    }) + "\\n")
    sys.stdout.flush()
    dist.barrier()
    if os.environ.get("HANG"):
        time.sleep(600)     # until Ctrl-C
"""
ARGS = ["--lr", "0.1", "a b", "it's", "$(touch pwned)", "--log-dir=~/x"]
CLUSTERRUN = [sys.executable, "-m", "clusterrun"]


@contextlib.contextmanager
def allocation_shell(slurm, tmp_path: Path, *salloc_args: str):
    """A real allocation (`salloc ARGS`) and the environment of its shell: (job, env)."""
    envfile = tmp_path / "salloc.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(slurm.conf), CLUSTERRUN_HOME=str(tmp_path / "crhome"))
    holder = subprocess.Popen(
        ["salloc", "--job-name=clusterrun-test", *salloc_args, "--", "sh", "-c",
         f'env -0 > {shlex.quote(str(envfile))}.tmp && mv {shlex.quote(str(envfile))}.tmp '
         f'{shlex.quote(str(envfile))} && exec sleep 600'],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    job = None
    try:
        deadline = time.monotonic() + 60
        while not envfile.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert envfile.exists(), f"salloc gave no shell: {holder.stderr.read() if holder.poll() is not None else ''}"
        shell_env = dict(kv.split("=", 1) for kv in envfile.read_text().split("\0") if "=" in kv)
        job = shell_env["SLURM_JOB_ID"]
        shell_env["CONTROLLER_ONLY"] = "this shell's own"
        yield job, shell_env
    finally:
        if job is not None:
            slurm.cancel(job)
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def dry_run_lines(slurm, tmp_path: Path, env: dict[str, str], *extra: str) -> tuple[list[str], str]:
    """The srun lines of `up --dry-run` for a `slurm: {nodes: 2}` file, 2 processes per node,
    in an allocation of the cluster's 3 nodes (the third a spare)."""
    script = tmp_path / "report.py"
    script.write_text(textwrap.dedent(REPORT))
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("slurm: {nodes: 2}\nnproc_per_node: 2\nmaster_port: 29680\nenv: {LR: '0.1 0.2'}\n")
    r = subprocess.run([*CLUSTERRUN, "up", "--dry-run", *extra, str(hosts), str(script), *ARGS],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("srun ")]
    assert [shlex.split(l)[4] for l in lines] == [f"--nodelist={n}" for n in slurm.names[:2]], r.stdout
    assert f"{slurm.names[2]}      spare" in r.stdout and f"# spare {slurm.names[2]}: no line" in r.stdout
    assert not (tmp_path / "crhome").exists(), "a dry run writes nothing"
    return lines, r.stdout


@pytest.fixture(autouse=True)
def torchrun_tmp():
    """torchrun without --log-dir makes its (empty) log directory /tmp/torchelastic_*; the nodes
    share this machine's /tmp: remove what the test made."""
    before = set(Path("/tmp").glob("torchelastic_*"))
    yield
    for path in set(Path("/tmp").glob("torchelastic_*")) - before:
        shutil.rmtree(path, ignore_errors=True)


def reports(text: str) -> list[dict]:
    return [json.loads(line.split("REPORT ", 1)[1]) for line in text.splitlines() if "REPORT {" in line]


def check_reports(slurm, tmp_path: Path, outputs: list[str]) -> None:
    """Node k's shell shows exactly node k's ranks, with the plan's environment and no more."""
    for node_rank, out in enumerate(outputs):
        got = sorted(reports(out), key=lambda r: r["rank"])
        assert [(r["rank"], r["local_rank"]) for r in got] == [(2 * node_rank, 0), (2 * node_rank + 1, 1)], out
        for r in got:
            assert r["hostname"] == slurm.names[node_rank] and r["world"] == 4 and r["sum"] == 10
            assert r["ifname"] == "eth0", "gloo bound to the cluster network, not 127.0.0.1"
            assert r["args"] == ARGS and r["cwd"] == str(tmp_path)
            assert r["slurm_conf"] == str(slurm.conf) and r["lr_env"] == "0.1 0.2"
            assert r["mine"] is None, "--export=NONE: the shell's own variables stay off the nodes"
    assert not (tmp_path / "pwned").exists()


def left_on_nodes(slurm, job: str) -> tuple[list[str], dict[str, list[int]]]:
    """The job's steps and the python processes on the nodes, once both are gone (20 s at most)."""
    deadline = time.monotonic() + 20
    while True:
        steps = slurm.steps(job)
        procs = {n: slurm.node_pids(n, "python") + slurm.node_pids(n, "python3") for n in slurm.names}
        if (not steps and not any(procs.values())) or time.monotonic() > deadline:
            return steps, {n: p for n, p in procs.items() if p}
        time.sleep(0.2)


def test_pasted_slurm_dry_run_lines_run_the_job_by_hand(slurm, tmp_path):
    with allocation_shell(slurm, tmp_path, "-N3", "--exclusive") as (job, env):
        lines, text = dry_run_lines(slurm, tmp_path, env)
        assert all(shlex.split(l)[1] == f"--jobid={job}" for l in lines)
        assert text.splitlines()[0].startswith(f"2 nodes of Slurm job {job} (and 1 spare), world size 4, "
                                               f"MASTER_ADDR={slurm.addr_of(slurm.names[0])} ")
        # Each line in a shell of its own, as in its own terminal (here without one: srun
        # says it disregards --pty, and goes on).
        shells = [subprocess.Popen(["bash", "-c", line], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
                  for line in lines]
        outputs = []
        try:
            for sh in shells:
                out, err = sh.communicate(timeout=180)
                assert sh.returncode == 0, out + err
                outputs.append(out)
        except subprocess.TimeoutExpired:
            # Say what every shell printed; killing each srun ends its step (the job's
            # cancel, on the way out, ends anything else).
            for sh in shells:
                if sh.poll() is None:
                    os.killpg(sh.pid, signal.SIGKILL)
            said = [sh.communicate() for sh in shells]
            raise AssertionError(f"a pasted line did not end within 180 s: {said}") from None
        finally:
            for sh in shells:
                if sh.poll() is None:
                    os.killpg(sh.pid, signal.SIGKILL)
        check_reports(slurm, tmp_path, outputs)
        assert left_on_nodes(slurm, job) == ([], {})


def test_ctrl_c_in_a_pasted_lines_terminal_ends_that_nodes_part(slurm, tmp_path):
    """--pty gives the node's command a terminal: Ctrl-C typed in each terminal stops
    torchrun and its workers there, and no step and no process is left."""
    import fcntl
    import termios

    with allocation_shell(slurm, tmp_path, "-N3", "--exclusive") as (job, env):
        lines, _ = dry_run_lines(slurm, tmp_path, env, "--env=HANG=1")
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
            read_until(masters, lambda: all(len(reports(b.decode(errors="replace"))) == 2
                                            for b in masters.values()), timeout=180)
            outputs = [bytes(b).decode(errors="replace") for b in masters.values()]
            check_reports(slurm, tmp_path, outputs)
            assert not any("disregarding --pty" in o for o in outputs), outputs
            for master in masters:
                os.write(master, b"\x03")           # Ctrl-C, typed in each terminal
            read_until(masters, lambda: all(sh.poll() is not None for sh in shells), timeout=60)
            assert all(sh.poll() is not None for sh in shells), [bytes(b).decode(errors="replace")
                                                                 for b in masters.values()]
            assert all(sh.returncode != 0 for sh in shells)
            assert left_on_nodes(slurm, job) == ([], {})
        finally:
            for sh in shells:
                if sh.poll() is None:
                    os.killpg(sh.pid, signal.SIGKILL)
                    sh.wait()
            for master in masters:
                os.close(master)
