"""End-to-end: one attempt numbering everywhere, on the sshd test cluster, both transports.

A run that may restart numbers its attempts from 0, as CLUSTERRUN_ATTEMPT does: `up`'s
messages, the `--- attempt K ---` markers of `logs`, `logs --attempt K`, `status`,
`status --json`, `ps` and result.json all say the same K of the same attempt. The last
failure's summary shows the lines of the attempt that failed, not an earlier one's.
"""

from __future__ import annotations

import json

import pytest

from kit import assert_nothing_left, hosts_file, write

pytestmark = pytest.mark.e2e

# Every attempt fails the same way; each line says which attempt printed it.
ALWAYS_FAILS = """\
    import os, sys
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, attempt = dist.get_rank(), os.environ["CLUSTERRUN_ATTEMPT"]
    print(f"rank {rank} in CLUSTERRUN_ATTEMPT={attempt}", flush=True)
    dist.barrier()
    if rank == 3:
        for i in range(3):
            print(f"rank 3 attempt {attempt} line {i}", flush=True)
        sys.exit(7)
    dist.barrier()
"""


def test_every_view_numbers_the_attempts_as_clusterrun_attempt_does(cluster, ctl, tmp_path):
    script = write(tmp_path / "fails.py", ALWAYS_FAILS)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = ctl.run("up", "--max-restarts", "1", "--restart-delay", "1", str(hosts), str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    n2 = cluster.names[1]
    err = r.stderr.splitlines()
    run_id = next(l.split()[2].rstrip(":") for l in err if l.startswith("clusterrun: run "))

    # up: the attempt the workers were told is 0 is "attempt 0".
    assert (f"clusterrun: attempt 0 of 0-1 failed: rank 3 ({n2}, local rank 1) exited with code 7; "
            "restarting in 1s") in err, r.stderr
    assert "clusterrun: attempt 1 of 0-1 failed too: no restart left" in err, r.stderr
    said = {l.split("] ", 1)[1] for l in r.stdout.splitlines() if "CLUSTERRUN_ATTEMPT=" in l}
    assert said == {f"rank {g} in CLUSTERRUN_ATTEMPT={k}" for g in range(4) for k in (0, 1)}, r.stdout

    # The summary's last lines of rank 3 are the failed attempt's (1), none of attempt 0's.
    i = err.index(f"clusterrun: rank 3 ({n2}, local rank 1) exited with code 7")
    tail = [l for l in err[i + 1:] if l.startswith("  | ")]
    assert [l for l in tail if "rank 3 attempt" in l] == [f"  | rank 3 attempt 1 line {k}" for k in range(3)], r.stderr
    assert not [l for l in tail if "attempt 0" in l or "ATTEMPT=0" in l], r.stderr

    # logs: the markers and --attempt K are the same K.
    def ours(text: str) -> list[str]:        # (torch's own warnings aside)
        return [l for l in text.splitlines() if l.startswith("---") or "] rank 3 " in l]

    logs = ctl.run("logs", "--rank", "3", run_id)
    assert ours(logs.stdout) == [
        "--- attempt 0 ---", f"[{n2} g3 l1] rank 3 in CLUSTERRUN_ATTEMPT=0",
        *[f"[{n2} g3 l1] rank 3 attempt 0 line {k}" for k in range(3)],
        "--- attempt 1 ---", f"[{n2} g3 l1] rank 3 in CLUSTERRUN_ATTEMPT=1",
        *[f"[{n2} g3 l1] rank 3 attempt 1 line {k}" for k in range(3)]], logs.stdout
    for k in (0, 1):
        one = ctl.run("logs", "--rank", "3", "--attempt", str(k), run_id)
        assert ours(one.stdout) == [f"[{n2} g3 l1] rank 3 in CLUSTERRUN_ATTEMPT={k}",
                                    *[f"[{n2} g3 l1] rank 3 attempt {k} line {j}" for j in range(3)]]
    beyond = ctl.run("logs", "--attempt", "2", run_id)
    assert beyond.returncode == 2 and f"run {run_id} has attempts 0-1, not 2" in beyond.stderr, beyond.stderr

    # status, status --json, ps and result.json: the run ended in attempt 1 of 0-1.
    status = ctl.run("status", run_id)
    assert status.stdout.splitlines()[0].startswith(f"run {run_id}: failed ("), status.stdout
    assert status.stdout.splitlines()[0].endswith(", attempt 1 of 0-1)"), status.stdout
    st = ctl.status(run_id)
    assert (st["state"], st["attempt"], st["max_restarts"]) == ("failed", 1, 1)
    row = next(l for l in ctl.run("ps").stdout.splitlines() if l.startswith(run_id))
    assert "failed, attempt 1 of 0-1 " in row, row
    result = json.loads((tmp_path / "crhome" / "runs" / run_id / "result.json").read_text())
    assert sorted((n["node"], n["attempt"]) for n in result) == [(cluster.names[0], 1), (n2, 1)]
    assert_nothing_left(cluster)
