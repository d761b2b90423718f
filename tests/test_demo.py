"""The README's demo: hosts.example.yaml (two localhost nodes x 2) and scripts/ddp_example.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Real torchrun and torch for tens of seconds, on this machine (no cluster, no root): end to end,
# so the full suite runs it and the fast tier (`-m "not e2e"`) does not.
pytestmark = pytest.mark.e2e


def test_demo_runs_on_localhost_nodes(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "clusterrun", "up", "hosts.example.yaml", "scripts/ddp_example.py",
         "--epochs", "1"],
        cwd=REPO, env={**__import__("os").environ, "CLUSTERRUN_HOME": str(tmp_path), "NO_COLOR": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    hello = re.findall(r"^\[(node\d) g(\d) l(\d)\] hello from rank (\d)/4 \(local rank (\d)\)", r.stdout, re.M)
    assert sorted(hello) == [("node0", "0", "0", "0", "0"), ("node0", "1", "1", "1", "1"),
                             ("node1", "2", "0", "2", "0"), ("node1", "3", "1", "3", "1")]
    assert re.search(r"^\[node0 g0 l0\] epoch 0 mean loss \d+\.\d+$", r.stdout, re.M)
