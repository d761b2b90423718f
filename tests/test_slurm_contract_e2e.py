"""End-to-end: what clusterrun promises over SSH, kept inside a Slurm allocation (fixture
`slurm`, scripts/slurmcluster), as a user types it (`salloc ... -- clusterrun ...`):

- `exec slurm -- CMD`: each node's exit code (a signal's 128+N), the failures named in one
  line, exit 1, and none of srun's own words;
- `check slurm`: a step with fewer CPUs than nproc_per_node fails the node, as `up` refuses it;
  `--json` gives each node's `cpus`;
- the environment of the ranks: the plan's (`env:`, `--env`), SLURM_CONF, and none of the
  controller's own variables (srun --export=NONE); Slurm's task variables describe the
  one-task step (SLURM_PROCID and SLURM_NODEID are 0 everywhere), and `up` warns (lint's
  CR007) when the script takes its rank from them;
- a failing `setup:` (exec) or a missing workdir (up) told in words per node, nothing started.

After each test no job is left in squeue and no python on a node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kit import write
from test_slurm_up_e2e import _env, assert_nothing_left

pytestmark = pytest.mark.e2e

CLUSTERRUN = [sys.executable, "-m", "clusterrun"]


def in_allocation(tmp_path: Path, salloc_args: list[str], *args: str, extra_env: dict[str, str] | None = None,
                  timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`salloc SALLOC_ARGS -- clusterrun ARGS` in tmp_path, with this shell's variables plus extra_env."""
    return subprocess.run(["salloc", "--job-name=clusterrun-test", *salloc_args, "--", *CLUSTERRUN, *args],
                          env={**_env(tmp_path), **(extra_env or {})}, cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def nodes(slurm):
    yield slurm.names
    assert_nothing_left(slurm)


def test_exec_slurm_gives_each_nodes_exit_code_and_names_the_failures(slurm, nodes, tmp_path):
    a, b, c = nodes
    r = in_allocation(tmp_path, ["-N3"], "exec", "slurm", "--", "sh", "-c",
                      'case $(hostname) in *-n1) echo "fine [$0]";; *-n2) echo "bad [$0]" >&2; exit 7;; '
                      '*) kill -9 $$;; esac', "it's $HOME")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"[{a}] fine [it's $HOME]" in r.stdout.splitlines()
    assert f"[{b}] bad [it's $HOME]" in (r.stdout + r.stderr).splitlines()
    failed = [l for l in r.stderr.splitlines() if l.startswith("clusterrun: sh -c ")]
    assert len(failed) == 1 and failed[0].endswith(f"failed on 2 of 3 nodes: {b} (exit 7), {c} (exit 137)"), \
        r.stderr
    assert "srun:" not in r.stderr and "Traceback" not in r.stderr, r.stderr

    r = in_allocation(tmp_path, ["-N3"], "exec", "slurm", "--", "no-such-command-here")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"clusterrun: no-such-command-here failed on 3 of 3 nodes: {a} (exit 127), {b} (exit 127), "
            f"{c} (exit 127)") in r.stderr.splitlines(), r.stderr

    r = in_allocation(tmp_path, ["-N3"], "exec", "slurm", "--", "true")
    assert r.returncode == 0 and "clusterrun:" not in r.stderr, r.stderr


def test_check_slurm_fails_a_step_with_fewer_cpus_than_processes(slurm, nodes, tmp_path):
    a, b = nodes[:2]
    write(tmp_path / "two.yaml", "slurm: {}\nnproc_per_node: 2\n")
    r = in_allocation(tmp_path, ["-N2", f"--nodelist={a},{b}"], "check", "two.yaml")
    assert r.returncode == 1, r.stdout + r.stderr
    for n in (a, b):
        row = next(l for l in r.stdout.splitlines() if l.startswith(n + " "))
        assert row.split()[-1] == "FAIL", r.stdout
        assert (f"clusterrun: {n}: the Slurm step gets 1 CPU (job " in r.stdout
                and "fewer than nproc_per_node 2" in r.stdout and "--exclusive" in r.stdout), r.stdout
    r = in_allocation(tmp_path, ["-N2", "--exclusive", f"--nodelist={a},{b}"], "check", "--json", "two.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert [(n["node"], n["cpus"], n["nproc"], n["ok"]) for n in data["nodes"]] == [(a, 2, 2, True),
                                                                                   (b, 2, 2, True)]


def test_the_ranks_get_the_plans_environment_and_none_of_the_controllers(slurm, nodes, tmp_path):
    a, b = nodes[:2]
    script = write(tmp_path / "envs.py", """\
        import json, os
        rank = int(os.environ["SLURM_PROCID"])      # wrong under torchrun: up warns (CR007)
        keys = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_CONF",
                "CONTROLLER_ONLY", "FROM_FILE", "FROM_OPTION", "PATH")
        print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
    """)
    write(tmp_path / "s.yaml", "slurm: {}\nnproc_per_node: 2\nenv: {FROM_FILE: 'a b'}\n")
    r = in_allocation(tmp_path, ["-N2", "--exclusive", f"--nodelist={a},{b}"],
                      "up", "--env", "FROM_OPTION=it's", "s.yaml", str(script),
                      extra_env={"CONTROLLER_ONLY": "this shell's own",
                                 "PATH": f"/tmp/not-on-the-nodes:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stdout + r.stderr
    warning = [l for l in r.stderr.splitlines() if l.startswith("clusterrun: warning: ")]
    assert len(warning) == 1 and "CR007" in warning[0] and "SLURM_PROCID" in warning[0], r.stderr
    seen = {}
    for line in r.stdout.splitlines():
        tag, _, rest = line.partition("] ENV ")
        if rest:
            seen[tag.lstrip("[")] = json.loads(rest)
    assert sorted(seen) == [f"{a} g0 l0", f"{a} g1 l1", f"{b} g2 l0", f"{b} g3 l1"], r.stdout
    job = {e["SLURM_JOB_ID"] for e in seen.values()}
    assert len(job) == 1 and job != {None}
    for tag, e in seen.items():
        assert e["RANK"] == tag.split()[1][1:] and e["LOCAL_RANK"] == tag.split()[2][1:]
        # Slurm's task variables describe the step of one task that runs the node's part
        assert (e["SLURM_PROCID"], e["SLURM_NODEID"]) == ("0", "0"), e
        assert e["SLURM_CONF"] == str(slurm.conf)
        assert (e["FROM_FILE"], e["FROM_OPTION"]) == ("a b", "it's")
        assert e["CONTROLLER_ONLY"] is None and "/tmp/not-on-the-nodes" not in e["PATH"], e


def test_a_failing_setup_or_workdir_is_told_in_words_and_nothing_starts(slurm, nodes, tmp_path):
    a, b = nodes[:2]
    write(tmp_path / "setup.yaml", "slurm: {}\nsetup: ['echo preparing', 'false']\n")
    r = in_allocation(tmp_path, ["-N2", f"--nodelist={a},{b}"], "exec", "setup.yaml", "--", "echo", "ran")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ran" not in r.stdout.split() and f"[{a}] preparing" in r.stdout.splitlines(), r.stdout
    assert "clusterrun: echo ran did not start on 2 of 2 nodes:" in r.stderr.splitlines(), r.stderr
    for n in (a, b):
        assert f"  {n}: setup failed with exit code 1: preparing" in r.stderr.splitlines(), r.stderr
    write(tmp_path / "workdir.yaml", "slurm: {}\nworkdir: /no/such/dir\n")
    script = write(tmp_path / "never.py", "print('started')\n")
    r = in_allocation(tmp_path, ["-N2", f"--nodelist={a},{b}"], "up", "workdir.yaml", str(script))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "clusterrun: preflight failed, nothing was started:" in r.stderr.splitlines(), r.stderr
    for n in (a, b):
        assert f"  {n}: workdir /no/such/dir: No such file or directory" in r.stderr.splitlines(), r.stderr
    assert "started" not in r.stdout and "Traceback" not in r.stderr
