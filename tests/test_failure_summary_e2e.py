"""End-to-end: the failure summary, `status`, `status --json` and result.json tell a rank that
failed by itself from one that was stopped, and what torchrun says of a node clusterrun
stopped stays one line; on the sshd test cluster, both transports.
"""

from __future__ import annotations

import json

import pytest

from kit import assert_nothing_left, hosts_file, write

pytestmark = pytest.mark.e2e

# A bad config found by every rank at the same moment, right after a barrier. Each rank's
# exit takes a moment (as torch's own teardown can): local rank 1's longer, so that its node's
# torchrun, which stops the other workers once one has failed, sends it SIGTERM after it has
# printed its own traceback, while it exits.
EVERY_RANK_RAISES = """\
    import atexit, os, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.barrier()
    atexit.register(time.sleep, 0.2 + 3 * int(os.environ["LOCAL_RANK"]))
    raise ValueError(f"rank {dist.get_rank()}: bad config")
"""


def test_ranks_that_raise_their_own_error_are_never_called_stopped(cluster, ctl, tmp_path):
    script = write(tmp_path / "badconfig.py", EVERY_RANK_RAISES)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = ctl.run("up", str(hosts), str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.splitlines()
    run_id = next(l.split()[2].rstrip(":") for l in err if l.startswith("clusterrun: run "))
    node_of = {0: cluster.names[0], 1: cluster.names[0], 2: cluster.names[1], 3: cluster.names[1]}
    # Each rank printed its own traceback...
    for g in range(4):
        assert [l for l in r.stdout.splitlines() if l.startswith(f"[{node_of[g]} g{g} l{g % 2}] ")
                and l.endswith(f"ValueError: rank {g}: bad config")], r.stdout
    # ...so the summary names each one as failed by itself, and none as stopped.
    named = {int(l.split()[2]): l for l in err if l.startswith("clusterrun: rank ")}
    assert sorted(named) == [0, 1, 2, 3], r.stderr
    for g, line in named.items():
        assert line.startswith(f"clusterrun: rank {g} ({node_of[g]}, local rank {g % 2}) "), line
        assert "stopped" not in line, r.stderr
        assert line.endswith(("exited with code 1", "raised ValueError, then was killed by SIGTERM while it exited")), line
    assert not [l for l in err if l.startswith("clusterrun: node ") and "stopped" in l], r.stderr

    # status, status --json and result.json agree: no rank was stopped, no node "killed".
    status = ctl.run("status", run_id).stdout
    assert "killed by" not in status and "stopped" not in status, status
    st = ctl.status(run_id)
    failures = {f["rank"]: f for n in st["nodes"] for f in n["failures"]}
    assert sorted(failures) == [0, 1, 2, 3] and not [f for f in failures.values() if f["stopped"]], st
    assert {f["raised"] for f in failures.values()} == {"ValueError"}, st
    result = json.loads((tmp_path / "crhome" / "runs" / run_id / "result.json").read_text())
    assert {f["rank"]: f["stopped"] for n in result for f in n["failures"]} == {g: False for g in range(4)}
    assert_nothing_left(cluster)


# torchrun gets one more SIGTERM as it exits (as the second of the two a stop sends it can
# come late): its handler raises SignalException inside an atexit callback, which Python
# prints under "Exception ignored in atexit callback:", after the report it already printed.
# The workers' site chains to this one (PYTHONPATH), so it runs in torchrun only.
LATE_SIGTERM_SITE = """\
    import atexit, os, signal

    if "RANK" not in os.environ:        # torchrun itself, not its workers
        def _late_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)

        atexit.register(_late_sigterm)
"""

ONE_RANK_FAILS = """\
    import sys, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 1:
        print("rank 1: bad shard", flush=True)
        sys.exit(7)
    time.sleep(600)
"""


def test_torchruns_report_in_any_shape_is_one_line_per_node(cluster, ctl, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    write(site / "sitecustomize.py", LATE_SIGTERM_SITE)
    script = write(tmp_path / "fails.py", ONE_RANK_FAILS)
    n1, n2 = cluster.names[:2]
    hosts = hosts_file(tmp_path, [n1, n2], nproc_per_node=1, env={"PYTHONPATH": str(site)})
    r = ctl.run("up", str(hosts), str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"clusterrun: rank 1 ({n2}, local rank 0) exited with code 7" in r.stderr.splitlines(), r.stderr
    run_id = next(l.split()[2].rstrip(":") for l in r.stderr.splitlines() if l.startswith("clusterrun: run "))
    # Nothing of torchrun's report shows raw on either node: the failed node's (its box,
    # then the late SignalException in its atexit callback) is one line, and so is what the
    # stopped node printed, if its torchrun printed anything before it was ended.
    for name in (n1, n2):
        torchruns = [l for l in r.stdout.splitlines() if l.startswith(f"[{name}] ")]
        for noise in ("Exception ignored", "SignalException", "got signal", "ChildFailedError", "Traceback",
                      "File \"", "closing signal"):
            assert not [l for l in torchruns if noise in l], r.stdout
        pointer = [l for l in torchruns if l.startswith(f"[{name}] (torchrun's own report")]
        assert len(pointer) == 1 if name == n2 else len(pointer) <= 1, r.stdout
    # The node's log keeps every line of it.
    node_log = ctl.run("logs", run_id, "--node", n2).stdout
    assert "Exception ignored in atexit callback" in node_log and "Root Cause" in node_log, node_log
    assert_nothing_left(cluster)
