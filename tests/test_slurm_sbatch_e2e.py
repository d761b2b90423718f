"""End-to-end: the sbatch script of docs/slurm.md ("In an sbatch script") on a real Slurm
cluster (fixture `slurm`, scripts/slurmcluster): `#SBATCH -N 2 --exclusive`, then
`clusterrun up slurm SCRIPT` in the batch script, submitted with `sbatch --wait`.

The batch script runs on the allocation's first node; clusterrun runs there and reaches
both nodes by srun steps. Afterwards nothing is left: no job in squeue, no process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit import REPORT, check_tags, write

pytestmark = pytest.mark.e2e


def test_an_sbatch_script_runs_clusterrun_up_slurm(slurm, tmp_path: Path):
    two = slurm.names[:2]
    script = write(tmp_path / "report.py", REPORT)
    out = tmp_path / "train.out"
    # The interpreter that runs the tests has clusterrun; on a cluster it is the venv's.
    clusterrun = shlex.join([sys.executable, "-m", "clusterrun"])
    batch = write(tmp_path / "train.sbatch", f"""\
        #!/bin/bash
        #SBATCH --job-name=clusterrun-test
        #SBATCH -N 2 --exclusive
        #SBATCH --nodelist={','.join(two)}
        #SBATCH --output={out}
        cd {shlex.quote(str(tmp_path))}
        {clusterrun} up --nproc-per-node 2 slurm {script.name} --lr 0.1
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(slurm.conf), CLUSTERRUN_HOME=str(tmp_path / "crhome"))
    r = subprocess.run(["sbatch", "--wait", str(batch)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    text = out.read_text() if out.exists() else ""
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n--- {out.name}:\n{text}"
    check_tags(text, two, [2, 2])                   # ranks, tags and hostnames agree, node order kept
    assert '"args": ["--lr", "0.1"]' in text
    assert "clusterrun: run " in text               # the summary went to the job's output too
    deadline = time.monotonic() + 20
    while (slurm.jobs() or any(slurm.node_pids(n, "python") for n in two)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm.jobs() == []
    assert {n: slurm.node_pids(n, "python") for n in two} == {n: [] for n in two}


def test_an_sbatch_script_exits_with_the_runs_code(slurm, tmp_path: Path):
    script = write(tmp_path / "fail.py", """\
        import os, sys
        sys.exit(7 if os.environ["RANK"] == "1" else 0)
    """)
    out = tmp_path / "fail.out"
    batch = write(tmp_path / "fail.sbatch", f"""\
        #!/bin/bash
        #SBATCH --job-name=clusterrun-test
        #SBATCH -N 2 --exclusive
        #SBATCH --output={out}
        cd {shlex.quote(str(tmp_path))}
        {shlex.join([sys.executable, "-m", "clusterrun"])} up slurm {script.name}
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(slurm.conf), CLUSTERRUN_HOME=str(tmp_path / "crhome"))
    r = subprocess.run(["sbatch", "--wait", str(batch)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    text = out.read_text() if out.exists() else ""
    assert r.returncode == 1, f"{r.stdout}{r.stderr}\n--- {out.name}:\n{text}"
    assert "exited with code 7" in text, text
