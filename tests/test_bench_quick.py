"""scripts/bench --quick: the benchmark runs end to end, and clusterrun's streamed lines are correct.

Two runs: the default sections on the SSH bench cluster, and `--only slurm` on a Slurm
test cluster of the bench's own (scripts/slurmcluster; prefix crbs, 10.243.20.0/24).

Correctness only: every line of every rank arrives once, whole, in order and with
the right tag. Timings on a shared CI machine say nothing; they are not checked.
The benchmark builds (and removes) its own cluster (prefix crb, 10.231.20.0/24),
so it can run next to the session's default crt cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"
NEEDS_ROOT = "needs root to create network namespaces (scripts/bench runs scripts/testcluster)"

# what --quick measures; each must be in the report, whatever its value
METRICS = (
    "fanout_4_vs_pdsh", "fanout_4_vs_pdsh_fastkex", "fanout_4_vs_serial",
    "memory_exec", "launch", "streaming", "kill", "memory_up",
)
COUNTS = ("lost", "spliced", "repeated", "out_of_order", "mislabelled")


def run_bench(tmp_path, *args: str):
    """scripts/bench --quick ARGS --json FILE: (the finished process, its JSON report)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{NEEDS_ROOT}; CI=true, so this is an error, not a skip")
        pytest.skip(NEEDS_ROOT)
    out = tmp_path / "bench.json"
    try:
        r = subprocess.run(
            [sys.executable, str(BENCH), "--quick", *args, "--json", str(out), "--lock-wait", "480"],
            cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
        )
    except subprocess.TimeoutExpired as e:   # the bench tears its cluster down on SIGTERM too
        pytest.fail(f"scripts/bench --quick did not finish in {e.timeout}s:\n{e.stderr or ''}")
    assert r.returncode != 75, f"another scripts/bench kept its cluster busy:\n{r.stderr}"
    assert out.exists(), f"no JSON report (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r, json.loads(out.read_text())


def test_bench_quick_streams_every_line_correctly(tmp_path):
    r, report = run_bench(tmp_path)

    # every metric is there (a value may be None, e.g. without pdsh; that is not checked)
    missing = [m for m in METRICS if m not in report["metrics"]]
    assert not missing, f"metrics missing from the report: {missing}\n{r.stdout}"
    assert [row["nodes"] for row in report["scaling"]] == [1, 2, 4]
    assert not report.get("clusterrun_failures"), report["clusterrun_failures"]

    # clusterrun's streamed lines: none lost, spliced, repeated, out of order or mislabelled,
    # on stdout (tagged) and in the per-rank logs
    st = report["streaming"]
    assert st["lines_per_rank"] > 0 and st["ranks"] == 4
    for where in ("clusterrun_stdout", "clusterrun_rank_logs"):
        assert st[where], f"no streaming run recorded for {where}"
        for run in st[where]:
            assert "error" not in run, run
            assert {k: run["total"][k] for k in COUNTS} == dict.fromkeys(COUNTS, 0), (where, run)
            for rank, counts in run["per_rank"].items():
                assert {k: counts[k] for k in COUNTS} == dict.fromkeys(COUNTS, 0), (where, rank, counts)
    for run in st["clusterrun_stdout"]:
        assert all(c["lines"] == st["lines_per_rank"] for c in run["per_rank"].values()), run
    # the baseline is counted (whatever it lost), so the two can be compared
    assert st["baseline"] and all(set(COUNTS) <= set(run["total"]) for run in st["baseline"])

    assert report["correct"] is True
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"


SLURM_METRICS = ("slurm_exec", "slurm_exec_login", "slurm_launch", "slurm_streaming", "slurm_streaming_srun_l")


def test_bench_quick_slurm_compares_with_srun_and_streams_every_line_correctly(tmp_path):
    r, report = run_bench(tmp_path, "--only", "slurm")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    missing = [m for m in SLURM_METRICS if m not in report["metrics"]]
    assert not missing, f"metrics missing from the report: {missing}\n{r.stdout}"
    # both sides of every comparison ran, and each of its runs succeeded
    for key in SLURM_METRICS:
        met = report["metrics"][key]
        assert met["anchor_runs"]["runs_s"] and not met["anchor_runs"]["failures"], (key, met)
    for key in ("slurm_exec", "slurm_launch", "slurm_streaming"):
        runs = report["metrics"][key]["clusterrun_runs"]
        assert runs["runs_s"] and not runs["failures"], (key, runs)
    assert not report.get("clusterrun_failures"), report["clusterrun_failures"]
    assert "cluster" not in report, "--only slurm made the SSH bench cluster too"

    sl = report["slurm"]
    assert sl["ranks"] == 4 and sl["lines_per_rank"] > 0
    for where in ("clusterrun_stdout", "clusterrun_rank_logs"):
        assert sl["stream_checks"][where], f"no streaming run recorded for {where}"
        for run in sl["stream_checks"][where]:
            assert "error" not in run, run
            assert {k: run["total"][k] for k in COUNTS} == dict.fromkeys(COUNTS, 0), (where, run)
    for run in sl["stream_checks"]["clusterrun_stdout"]:
        assert all(c["lines"] == sl["lines_per_rank"] for c in run["per_rank"].values()), run
    # the hand-launched outputs are counted, whatever they lost, so that they can be compared
    for key in ("tee", "srun_l"):
        assert sl["stream_checks"][key] and all(set(COUNTS) <= set(run["total"]) for run in sl["stream_checks"][key])
    # lines over 1024 bytes: whole through clusterrun; srun -l cuts every one into pieces
    long = sl["long_lines"]
    assert long["clusterrun"] == {"rc": 0, "expected": 200, "whole": 200, "pieces": 0, "not_whole": 0}, long
    assert long["srun_l"]["rc"] == 0 and long["srun_l"]["whole"] == 0 and long["srun_l"]["pieces"] > 200, long
    assert report["correct"] is True
